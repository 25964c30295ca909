"""Typed stage specs: `environments/base.yaml` deep-merged under one stage file, validated by pydantic.

Everything a stage declares is in one `StageSpec`. Loading never half-succeeds: it returns a fully
validated spec or raises `SpecError` naming the file, the field path, the line and what is allowed.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from urllib.parse import urlsplit
from typing import Annotated, Any, Iterator, Literal, Optional

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError,
                      field_validator, model_validator)

from mlops.errors import NotInProject, SpecError, excerpt
from mlops.yamlsource import YamlSource, deep_merge, load_yaml_source

PROJECT_FILE = "Pulumi.yaml"
SPECS_FOLDER = "environments"
REPO_ROOT = Path(__file__).resolve().parent.parent
"""The folder holding this `mlops` package: with an editable install, the clone it was installed from. That
clone's tests and benchmarks find its files by it; commands never do: they work on `project_root()`, the
project they are run in, which may be another clone or worktree."""
ENVIRONMENTS_DIR = REPO_ROOT / SPECS_FOLDER
"""The specs shipped in that clone, which test fixtures copy."""
SHIPPED_STAGES = ("dev", "staging", "prod")
SWARM_EXAMPLE_STAGE = "cluster"
"""The shipped example of a stage on a Docker Swarm (environments/cluster.yaml). It builds its workloads like
dev, so it comes up on a fresh cluster without anything promoted to it."""
BUILDING_KINDS = ("dev", "experiment")

# Matched whole (`fullmatch`): `$` would also accept a trailing newline.
DIGEST_REF = re.compile(r"[a-z0-9][a-z0-9._/:-]{0,254}@sha256:[0-9a-f]{64}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
DNS_LABEL = re.compile(r"[a-z]([a-z0-9-]*[a-z0-9])?")
MAX_DNS_LABEL = 63
# Folders of the project, named plainly: no absolute path, no `..`, nothing hidden.
BUILD_CONTEXT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*")
MAX_BUILD_CONTEXT = 200
NANO = 1_000_000_000

_chosen_project: ContextVar[Optional[Path]] = ContextVar("mlops_project", default=None)


def is_project(folder: Path) -> bool:
    return (folder / PROJECT_FILE).is_file() and (folder / SPECS_FOLDER).is_dir()


def project_root() -> Path:
    """The MLOps stack project being worked on, which holds the specs, the build contexts and the stack files:
    the one chosen with `working_on`, else the nearest folder from the current directory upwards that holds
    Pulumi.yaml and environments/. Asked at every call, never cached, so whoever changes directory (a test, a
    second worktree) gets the project it is in; Pulumi runs `__main__.py` from the project folder."""
    chosen = _chosen_project.get()
    if chosen is not None:
        return chosen
    try:
        start = Path.cwd()
    except FileNotFoundError:
        raise NotInProject(Path(".")) from None
    for folder in (start, *start.parents):
        if is_project(folder):
            return folder
    raise NotInProject(start)


def environments_dir() -> Path:
    """The specs of the project worked on."""
    return project_root() / SPECS_FOLDER


def project_of(environments: Path) -> Path:
    """The project a specs folder belongs to: its parent when that is a project; a loose copy of specs (a test's,
    or one extracted from a git revision) is read against the project worked on."""
    parent = environments.absolute().parent
    return parent if is_project(parent) else project_root()


@contextmanager
def working_on(project: Path) -> Iterator[Path]:
    """Within the block, `project_root()` answers `project`: e.g. the clone an `--environments` folder is in."""
    token = _chosen_project.set(project)
    try:
        yield project
    finally:
        _chosen_project.reset(token)


def build_context_problem(context: str) -> Optional[str]:
    """Why `context` is no build context of the project, or None."""
    if len(context) > MAX_BUILD_CONTEXT or not BUILD_CONTEXT.fullmatch(context):
        return (f"build context '{excerpt(context)}' is not a folder of this project: use a relative path such as "
                "images/training")
    if not (project_root() / context / "Dockerfile").is_file():
        return f"build context '{context}' has no Dockerfile"
    return None

StageKind = Literal["dev", "staging", "prod", "experiment"]
Port = Annotated[int, Field(ge=1024, le=65535)]


def provider_cpus(cpus: float) -> str:
    """`cpus` exactly as the Docker provider reads it back (terraform-provider-docker v4.5.0,
    internal/provider/helpers.go nanoInt64ToDecimalString): nine decimals; when that string holds exactly
    nine zeros it is re-rendered with one decimal (1 -> "1.0", 0.05 -> "0.1"), otherwise trailing zeros are
    cut (1.5 -> "1.5", 10 -> "10."). `cpus` is ForceNew, so rendering it any other way replaces the
    container on every `pulumi up`."""
    nanos = round(cpus * NANO)
    if nanos == 0:
        return "0"
    nine_decimals = f"{nanos // NANO}.{nanos % NANO:09d}"
    if nine_decimals.count("0") == 9:
        tenths = (nanos + NANO // 20) // (NANO // 10)  # big.Rat.FloatString rounds half away from zero
        return f"{tenths // 10}.{tenths % 10}"
    return nine_decimals.rstrip("0")


def parse_cpus(text: str) -> int:
    """Nano-CPUs of a provider `cpus` string, as Docker's opts.ParseCPUs reads it."""
    whole, _, fraction = text.partition(".")
    return int(whole or "0") * NANO + int((fraction + "0" * 9)[:9])


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(StrictModel):
    cpus: float = Field(gt=0, le=64, description="CPU cores the container may use")
    memory_mb: int = Field(ge=32, le=262144, description="hard memory limit in MiB")

    @field_validator("cpus")
    @classmethod
    def _provider_round_trip(cls, cpus: float) -> float:
        # The provider reads `cpus` back rounded (see components.containers.provider_cpus); a value that does
        # not survive that round trip would show as a replacement on every `pulumi up`.
        if round(cpus * NANO) == 0:
            raise ValueError(f"{cpus} is below one nano-CPU, and Docker reads 0 as no limit at all; use e.g. 0.1")
        if parse_cpus(provider_cpus(cpus)) != round(cpus * NANO):
            raise ValueError(f"{cpus} is read back by the Docker provider as \"{provider_cpus(cpus)}\", so every "
                             "`pulumi up` would replace the container; use a value such as 0.1, 0.25, 0.5, 1 or 1.5")
        return cpus


class DockerHost(StrictModel):
    url: str = "unix:///var/run/docker.sock"
    ssh_opts: list[str] = Field(default_factory=list)
    platform: Literal["linux/amd64", "linux/arm64"] = Field(
        default="linux/amd64", description="platform of every image built or pulled for this host")
    address: Optional[str] = Field(
        default=None, description="where the host's published ports are reached from the machine running mlops; "
                                  "default: 127.0.0.1 for unix://, the URL's host for tcp://, an SSH tunnel for ssh://")

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        if not url.startswith(("unix://", "ssh://", "tcp://")):
            raise ValueError("must start with unix://, ssh:// or tcp://")
        if url.startswith("unix://"):
            return url
        parts = urlsplit(url)
        if not parts.hostname:
            raise ValueError(f"'{excerpt(url)}' names no host; use ssh://user@host or tcp://host:2376")
        try:
            parts.port  # noqa: B018 - reading it is the check: urllib raises on a port that is no number 0..65535
        except ValueError:
            raise ValueError(f"'{excerpt(url)}' has a port that is not a number from 0 to 65535") from None
        return url

    @property
    def is_local(self) -> bool:
        return self.url.startswith("unix://")

    @property
    def published_host(self) -> Optional[str]:
        """The name other machines reach a tcp:// host's published ports by; None where they are reached
        over loopback (unix://) or an SSH tunnel (ssh://)."""
        if self.is_local or self.url.startswith("ssh://"):
            return None
        return self.address or urlsplit(self.url).hostname


class ImageSource(StrictModel):
    """An image either built from a folder of this repo (tagged by content hash) or pinned by reference."""

    build: Optional[str] = Field(default=None, description="build context, relative to the project root")
    ref: Optional[str] = Field(default=None, description="image reference, name@sha256:<digest>")

    @model_validator(mode="after")
    def _exactly_one(self) -> "ImageSource":
        if (self.build is None) == (self.ref is None):
            raise ValueError("set exactly one of 'build' (a folder of this repo) or 'ref' (name@sha256:digest)")
        problem = None if self.build is None else build_context_problem(self.build)
        if problem is not None:
            raise ValueError(problem)
        return self


class PublishedPort(StrictModel):
    host_port: Optional[Port] = Field(default=None, description="None lets Docker choose (experiments)")
    bind_address: str = "127.0.0.1"
    public: bool = Field(default=False, description="must be true to bind anything but 127.0.0.1")

    @model_validator(mode="after")
    def _loopback_unless_public(self) -> "PublishedPort":
        if self.bind_address != "127.0.0.1" and not self.public:
            raise ValueError(f"bind_address {self.bind_address} needs 'public: true'; only 127.0.0.1 is allowed otherwise")
        return self


class HealthCheck(StrictModel):
    interval_s: int = Field(default=5, ge=1, le=300)
    timeout_s: int = Field(default=3, ge=1, le=60)
    retries: int = Field(default=3, ge=1, le=20)
    start_period_s: int = Field(default=20, ge=0, le=600)


class Labels(StrictModel):
    owner: str = Field(min_length=1)
    cost_centre: str = Field(min_length=1)


class ArtifactStoreSpec(StrictModel):
    protect: bool = Field(default=False, description="protect and retain the data volumes on delete")


class ModelRegistrySpec(StrictModel):
    image: ImageSource
    port: PublishedPort
    limits: Limits
    health_check: HealthCheck = HealthCheck()


class ImageRegistrySpec(StrictModel):
    enabled: bool = True
    image: ImageSource
    port: PublishedPort
    username: str = Field(default="mlops", pattern=r"^[a-z][a-z0-9_-]{0,31}$")
    limits: Limits
    health_check: HealthCheck = HealthCheck()


class TrainingSpec(StrictModel):
    build: Optional[str] = Field(default=None, description="build context of the training image; dev and experiments only")
    base_image: str = Field(description="build argument BASE_IMAGE of the training and serving images")
    limits: Limits
    gpu: bool = Field(default=False, description="request all GPUs of the host for training runs")


class ModelPin(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
    version: int | Literal["latest"] = Field(description="registry version, or 'latest' (dev and experiments only)")
    sha256: Optional[str] = None

    @field_validator("version")
    @classmethod
    def _positive(cls, version: int | str) -> int | str:
        if isinstance(version, int) and version < 1:
            raise ValueError("must be a positive integer or 'latest'")
        return version

    @field_validator("sha256")
    @classmethod
    def _hex(cls, sha256: Optional[str]) -> Optional[str]:
        if sha256 is not None and not SHA256_HEX.fullmatch(sha256):
            raise ValueError("must be 64 lowercase hex characters")
        return sha256

    @property
    def is_pinned(self) -> bool:
        return isinstance(self.version, int) and self.sha256 is not None


class ReleaseImages(StrictModel):
    training: Optional[str] = None
    serving: Optional[str] = None


class Release(StrictModel):
    """The pins `mlops promote` copies from stage to stage."""

    model: ModelPin
    images: ReleaseImages = ReleaseImages()


class RolloutPolicy(StrictModel):
    """How the gateway moves traffic to green without a person, judged from Prometheus, and when it gives up.
    Numbers are strict: a quoted "0.05" is a typo to report, not a value to guess at."""

    steps: list[Annotated[StrictInt, Field(ge=1, le=100)]] = Field(
        min_length=1, description="green's weight in percent at each step, strictly increasing, ending at 100")
    bake_time_s: StrictInt = Field(ge=1, le=86400, description="seconds each step is watched before the next")
    max_error_rate_increase: StrictFloat = Field(
        ge=0, le=1, description="green's error rate may exceed blue's by at most this fraction (0.01 = 1 point)")
    max_p99_latency_ratio: StrictFloat = Field(ge=1, le=100, description="green's p99 latency may be at most this "
                                                                         "multiple of blue's")
    min_requests: StrictInt = Field(default=20, ge=1, le=1_000_000,
                                    description="requests green must answer in a step before it is judged")
    check_interval_s: StrictInt = Field(default=5, ge=1, le=300, description="seconds between two judgements")

    @field_validator("steps")
    @classmethod
    def _increasing_to_100(cls, steps: list[int]) -> list[int]:
        for earlier, later in zip(steps, steps[1:]):
            if later <= earlier:
                raise ValueError(f"steps must be strictly increasing, got {later} after {earlier}")
        if steps[-1] != 100:
            raise ValueError(f"the last step must be 100 (all traffic to green), got {steps[-1]}")
        return steps


class CanaryRelease(StrictModel):
    model: ModelPin
    serving_image: Optional[str] = Field(default=None, description="defaults to the blue serving image")
    rollout: Optional[RolloutPolicy] = Field(default=None, description="move traffic to green step by step, "
                                                                       "rolling back to blue on a breached limit")


class TrafficSplit(StrictModel):
    blue: int = Field(default=100, ge=0, le=100)
    green: int = Field(default=0, ge=0, le=100)

    @model_validator(mode="after")
    def _adds_up(self) -> "TrafficSplit":
        if self.blue + self.green != 100:
            raise ValueError(f"blue ({self.blue}) + green ({self.green}) must add up to 100")
        return self


class GatewaySpec(StrictModel):
    image: ImageSource
    limits: Limits


class SamplingSpec(StrictModel):
    """Serving keeps a share of its infer rows with their predictions on the samples volume, as the next training
    data to label. Off unless declared, in every stage: the rows are what users sent, which may be personal data,
    so prod declares it only where that is allowed (docs/contracts.md)."""

    fraction: float = Field(gt=0, le=1, description="share of inferred rows kept, e.g. 0.01; 1 keeps every row")
    max_mb: int = Field(default=100, ge=1, le=100_000,
                        description="MiB each replica's samples file may grow to; rows beyond it are dropped and "
                                    "counted (mlops_samples_dropped_rows_total)")


class BatchingSpec(StrictModel):
    """Adaptive batching in each replica: infer requests that arrive together share one predict call, each
    answered with its own rows (images/serving/serving/batching.py; docs/batching.md says when to turn it on).
    Off unless declared."""

    max_batch_size: int = Field(ge=2, le=4096, description="rows one predict call may stack from concurrent "
                                                           "requests; a request with more is predicted alone. Above a "
                                                           "few thousand rows a call blocks every other request for "
                                                           "milliseconds and saves nothing more")
    max_batch_time_ms: float = Field(gt=0, description="longest a request waits for company: for requests already "
                                                       "on their way in (oip), for any (mlserver)")


class ServingSpec(StrictModel):
    build: Optional[str] = Field(default=None, description="build context of the serving image; dev and experiments only")
    runtime: Literal["oip", "mlserver"] = Field(default="oip", description="model server inside the serving image")
    replicas: int = Field(default=1, ge=1, le=16)
    limits: Limits
    port: PublishedPort
    health_check: HealthCheck = HealthCheck()
    traffic: TrafficSplit = TrafficSplit()
    green: Optional[CanaryRelease] = None
    gateway: GatewaySpec
    sampling: Optional[SamplingSpec] = Field(default=None, description="keep a share of the infer rows and their "
                                                                       "predictions to label; absent: off")
    batching: Optional[BatchingSpec] = Field(default=None, description="stack concurrent requests into one predict "
                                                                       "call; absent: off")


class MonitoringSpec(StrictModel):
    """Prometheus for the stage: what it scrapes follows the declared replicas (components/monitoring.py)."""

    image: ImageSource = Field(default_factory=lambda: ImageSource(build="images/prometheus"))
    port: PublishedPort
    limits: Limits = Limits(cpus=0.5, memory_mb=512)
    health_check: HealthCheck = HealthCheck()
    scrape_interval_s: int = Field(default=15, ge=1, le=300, description="seconds between two scrapes of a target")
    evaluation_interval_s: int = Field(default=15, ge=1, le=300, description="seconds between two rule evaluations")
    retention_days: int = Field(default=15, ge=1, le=3650, description="days of samples Prometheus keeps")
    drift_threshold: float = Field(default=0.2, gt=0, le=10,
                                   description="PSI of a feature above which the InputDrift alert fires "
                                               "(0.1: a shift worth a look, 0.25: a large one)")
    drift_window_rows: int = Field(default=1000, ge=100, le=100_000,
                                   description="recent rows each replica compares with the training data")


class PromotionGates(StrictModel):
    min_metrics: dict[str, float] = Field(default_factory=dict, description="metric -> lowest value a promoted model may have")


class ParityRules(StrictModel):
    may_differ: list[str] = Field(default_factory=list, description="dotted spec paths stages may declare differently")


class ExperimentInfo(StrictModel):
    name: str
    owner: str
    source_stage: str
    created_at: str
    expires_at: str


NODE_LABEL = r"[a-z][a-z0-9._-]{0,62}"
# What Swarm's placement accepts and the provider reads back unchanged: one attribute, `==` or `!=`, one value.
PLACEMENT_CONSTRAINT = re.compile(r"node\.(hostname|role|id|platform\.(os|arch)|labels\." + NODE_LABEL + r") (==|!=) [A-Za-z0-9._-]+")
SPREAD_DESCRIPTOR = re.compile(r"node\.(hostname|labels\." + NODE_LABEL + ")")
REGISTRY_ADDRESS = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?:[0-9]{1,5}")


def _placement_constraint(constraint: str) -> str:
    if not PLACEMENT_CONSTRAINT.fullmatch(constraint):
        raise ValueError(f"'{excerpt(constraint)}' is no placement constraint; write e.g. 'node.labels.gpu == true' "
                         "or 'node.role != manager' (node.hostname|role|id|platform.os|platform.arch|labels.NAME, "
                         "then == or !=, then a value)")
    return constraint


PlacementConstraint = Annotated[str, AfterValidator(_placement_constraint)]


class SwarmTraining(StrictModel):
    constraints: list[PlacementConstraint] = Field(default_factory=list, description="placement constraints of training runs")
    generic_resources: dict[Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,62}$")], Annotated[int, Field(ge=1, le=64)]] = Field(
        default_factory=dict, description="generic resources a training run reserves, e.g. {NVIDIA-GPU: 1}; nodes "
                                          "advertise them in their engine's node-generic-resources")


class SwarmSpec(StrictModel):
    """A stage on a Docker Swarm: `docker.url` is a manager, and the stack runs as services over its nodes."""

    registry_address: str = Field(description="host:port every node pulls the stage's images from: the stateful "
                                              "node's address and image_registry.port.host_port, listed in every "
                                              "engine's insecure-registries")
    stateful_label: str = Field(default="mlops.stateful", pattern=f"^{NODE_LABEL}$",
                                description="nodes labelled <label>=true run MLflow and the image registry (their "
                                            "volumes are local to that node)")
    edge_label: str = Field(default="mlops.edge", pattern=f"^{NODE_LABEL}$",
                            description="every node labelled <label>=true runs one gateway on serving.port")
    spread_over: str = Field(default="node.hostname", description="replicas spread evenly over this node attribute")
    constraints: list[PlacementConstraint] = Field(default_factory=list, description="placement constraints of the serving replicas")
    reservations: Limits = Field(description="what each serving replica reserves on its node")
    training: SwarmTraining = SwarmTraining()

    @field_validator("spread_over")
    @classmethod
    def _spread_descriptor(cls, descriptor: str) -> str:
        if not SPREAD_DESCRIPTOR.fullmatch(descriptor):
            raise ValueError(f"'{excerpt(descriptor)}' cannot be spread over; use node.hostname or node.labels.NAME")
        return descriptor

    @field_validator("registry_address")
    @classmethod
    def _host_and_port(cls, address: str) -> str:
        if not REGISTRY_ADDRESS.fullmatch(address) or not 1 <= int(address.rpartition(":")[2]) <= 65535:
            raise ValueError(f"'{excerpt(address)}' is not host:port, e.g. 10.0.0.10:5001")
        return address


class StageSpec(StrictModel):
    stage: str
    kind: StageKind
    docker: DockerHost = DockerHost()
    swarm: Optional[SwarmSpec] = Field(default=None, description="run the stage as services on a Docker Swarm")
    labels: Labels
    artifact_store: ArtifactStoreSpec = ArtifactStoreSpec()
    model_registry: ModelRegistrySpec
    image_registry: ImageRegistrySpec
    training: TrainingSpec
    serving: ServingSpec
    release: Optional[Release] = None
    gates: PromotionGates = PromotionGates()
    parity: ParityRules = ParityRules()
    monitoring: Optional[MonitoringSpec] = Field(default=None, description="Prometheus scraping the gateway and replicas")
    experiment: Optional[ExperimentInfo] = None

    @property
    def builds_workloads(self) -> bool:
        return self.kind in BUILDING_KINDS

    def published_ports(self) -> dict[str, PublishedPort]:
        ports = {"model_registry.port": self.model_registry.port, "serving.port": self.serving.port}
        if self.image_registry.enabled:
            ports["image_registry.port"] = self.image_registry.port
        if self.monitoring is not None:
            ports["monitoring.port"] = self.monitoring.port
        return ports

    @property
    def image_registry_server(self) -> Optional[str]:
        """The stage's own registry as its Docker engine reaches it: over loopback, which the engine trusts
        without TLS; on a swarm, at the address every node lists as an insecure registry. Promoted images are pinned under this name, so the engine pulls them from here.
        None where Docker chooses the port (experiments, which build rather than pull)."""
        port = self.image_registry.port.host_port
        if self.swarm is not None:
            return self.swarm.registry_address
        return None if port is None else f"localhost:{port}"

    def promoted_image_pins(self) -> dict[str, str]:
        """Every image this stage runs that was promoted to it, by spec path."""
        pins: dict[str, str] = {}
        if self.release is not None:
            pins |= {f"release.images.{role}": ref for role, ref in
                     (("training", self.release.images.training), ("serving", self.release.images.serving)) if ref}
        if self.serving.green is not None and self.serving.green.serving_image is not None:
            pins["serving.green.serving_image"] = self.serving.green.serving_image
        return pins

    def images(self) -> dict[str, ImageSource | str | None]:
        """Every image this stage runs, by spec path, for the pinning invariant."""
        found: dict[str, ImageSource | str | None] = {
            "model_registry.image": self.model_registry.image,
            "image_registry.image": self.image_registry.image,
            "serving.gateway.image": self.serving.gateway.image,
        }
        if self.monitoring is not None:
            found["monitoring.image"] = self.monitoring.image
        if self.release is not None:
            found["release.images.training"] = self.release.images.training
            found["release.images.serving"] = self.release.images.serving
        if self.serving.green is not None and self.serving.green.serving_image is not None:
            found["serving.green.serving_image"] = self.serving.green.serving_image
        return found


def stage_kind(stage: str) -> StageKind:
    if stage in ("dev", "staging", "prod"):
        return stage  # type: ignore[return-value]
    return "dev" if stage == SWARM_EXAMPLE_STAGE else "experiment"


def check_invariants(spec: StageSpec) -> list[tuple[str, str]]:
    """Rules that span fields; returns (field path, message) for each one broken."""
    broken: list[tuple[str, str]] = []
    if spec.builds_workloads:
        for path, context in (("training.build", spec.training.build), ("serving.build", spec.serving.build)):
            if context is None:
                broken.append((path, f"{spec.kind} stages build their workload images: set a build context"))
            elif (problem := build_context_problem(context)) is not None:
                broken.append((path, problem))
    else:
        for path, context in (("training.build", spec.training.build), ("serving.build", spec.serving.build)):
            if context is not None:
                broken.append((path, f"{spec.kind} never builds workload images (build once, promote by digest); remove it"))
        if spec.release is not None:
            pin = spec.release.model
            if not pin.is_pinned:
                broken.append(("release.model", "outside dev, pin the model by an integer version and its sha256"))
            for role in ("training", "serving"):
                if getattr(spec.release.images, role) is None:
                    broken.append((f"release.images.{role}", "promoted stages run the image digest promoted to them: name@sha256:<digest>"))
        if spec.serving.green is not None and not spec.serving.green.model.is_pinned:
            broken.append(("serving.green.model", "outside dev, pin the model by an integer version and its sha256"))

    if spec.serving.traffic.green > 0 and spec.serving.green is None:
        broken.append(("serving.traffic.green", "is above 0 but no 'serving.green' release is declared to receive it"))
    rollout = spec.serving.green.rollout if spec.serving.green is not None else None
    if rollout is not None and spec.monitoring is None:
        broken.append(("serving.green.rollout", "a rollout is judged from the stage's Prometheus: declare "
                                                "'monitoring' too"))
    elif rollout is not None and rollout.bake_time_s < 4 * spec.monitoring.scrape_interval_s:
        broken.append(("serving.green.rollout.bake_time_s", f"{rollout.bake_time_s} s is shorter than 4 scrapes of "
                                                            f"monitoring.scrape_interval_s ({spec.monitoring.scrape_interval_s} "
                                                            "s), the least a step is judged over"))
    elif rollout is not None and rollout.steps[0] <= spec.serving.traffic.green:
        broken.append(("serving.green.rollout.steps", f"the first step ({rollout.steps[0]}) must be above the declared "
                                                      f"serving.traffic.green ({spec.serving.traffic.green}), where "
                                                      "the rollout starts"))
    batching = spec.serving.batching
    if batching is not None and batching.max_batch_time_ms >= spec.serving.health_check.timeout_s * 1000:
        broken.append(("serving.batching.max_batch_time_ms",
                       f"{batching.max_batch_time_ms:g} ms is not below serving.health_check.timeout_s "
                       f"({spec.serving.health_check.timeout_s} s): a request would wait for company longer than a "
                       "replica may take to answer at all; use a few milliseconds"))
    if spec.serving.sampling is not None and spec.serving.runtime != "oip":
        broken.append(("serving.sampling", f"the {spec.serving.runtime} runtime does not sample requests; use "
                                           "serving.runtime oip, or remove sampling"))
    if spec.kind in ("staging", "prod"):
        for path, image in spec.images().items():
            ref = image.ref if isinstance(image, ImageSource) else image
            if ref is not None and not DIGEST_REF.fullmatch(ref):
                broken.append((path, f"'{excerpt(ref)}' is not pinned by digest; use name@sha256:<64 hex> (no 'latest', no bare tag)"))
    if spec.kind in ("staging", "prod"):
        own = f"{spec.image_registry_server}/{spec.stage}/"
        for path, ref in spec.promoted_image_pins().items():
            if not spec.image_registry.enabled or spec.image_registry_server is None:
                broken.append(("image_registry", f"{spec.stage} runs promoted images ({path}), which are copied "
                                                 "into its own image registry: enable it with a fixed port.host_port"))
            elif DIGEST_REF.fullmatch(ref) and not ref.startswith(own):
                broken.append((path, f"'{ref}' names another stage's registry; {spec.stage} pulls only from its own "
                                     f"({own}<image>@sha256:<digest>): promote with `mlops promote --to {spec.stage}`, "
                                     "which copies the image there"))
    if spec.kind == "prod":
        if spec.serving.replicas < 2:
            broken.append(("serving.replicas", f"prod serves with at least 2 replicas, got {spec.serving.replicas}"))
        if not spec.artifact_store.protect:
            broken.append(("artifact_store.protect", "prod data volumes must be protected: set true"))
    if spec.swarm is not None:
        broken.extend(swarm_problems(spec, spec.swarm))
    if spec.kind == "experiment" and spec.experiment is None:
        broken.append(("experiment", "experiment stages carry their name, owner and expiry"))
    return broken


def swarm_problems(spec: StageSpec, swarm: SwarmSpec) -> list[tuple[str, str]]:
    """Rules of a swarm stage; the rest of its spec means what it means on one host."""
    broken: list[tuple[str, str]] = []
    for path, port in spec.published_ports().items():
        # Swarm publishes a port on every address of the node: a loopback-only port does not exist there.
        if not port.public or port.bind_address != "0.0.0.0":
            broken.append((path, "a swarm publishes ports on every address of a node: set bind_address: 0.0.0.0 "
                                 "and public: true (and firewall the nodes' network)"))
    if spec.serving.green is not None and spec.serving.green.rollout is not None:
        broken.append(("serving.green.rollout", "not on a swarm stage: every edge node runs a gateway of its own, "
                                                "and each would move green's weight and record the rollout on its "
                                                "own; move serving.traffic in the stage file instead"))
    if spec.serving.sampling is not None:
        broken.append(("serving.sampling", "not on a swarm stage: replicas run on many nodes and the samples volume "
                                           "is local to one; remove 'serving.sampling' or 'swarm'"))
    if spec.image_registry.enabled and spec.image_registry.port.host_port != int(swarm.registry_address.rpartition(":")[2]):
        broken.append(("swarm.registry_address", f"the port must be image_registry.port.host_port "
                                                 f"({spec.image_registry.port.host_port}), where the registry listens"))
    if not spec.image_registry.enabled:
        broken.append(("image_registry.enabled", "a swarm stage needs its registry: every node pulls the stage's images from it"))
    for resource in ("cpus", "memory_mb"):
        if getattr(swarm.reservations, resource) > getattr(spec.serving.limits, resource):
            broken.append((f"swarm.reservations.{resource}", f"reserves more than serving.limits.{resource} "
                                                            f"({getattr(spec.serving.limits, resource)}) allows"))
    if spec.training.gpu and not (swarm.training.generic_resources or swarm.training.constraints):
        broken.append(("training.gpu", "on a swarm, place GPU training with swarm.training.generic_resources "
                                       "(e.g. {NVIDIA-GPU: 1}) or a node label in swarm.training.constraints"))
    return broken


def _spec_error_from_validation(err: ValidationError, source: YamlSource) -> SpecError:
    first = err.errors(include_url=False)[0]
    path = tuple(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        parent = first["loc"][:-1]
        message = f"unknown key '{excerpt(path[-1])}'; allowed here: {', '.join(_allowed_keys(parent))}"
    elif first["type"] == "literal_error" or "Input should be" in message:
        message = f"{message} (got {excerpt(repr(first.get('input')))})"
    file, line = source.locate(path)
    return SpecError(file=file, field=".".join(excerpt(part) for part in path), message=message, line=line)


def _allowed_keys(parent_loc: tuple) -> list[str]:
    model: Any = StageSpec
    for part in parent_loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            break
        annotation = field.annotation
        for candidate in getattr(annotation, "__args__", (annotation,)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                model = candidate
                break
    return sorted(model.model_fields)


def build_spec(stage: str, data: dict, source: YamlSource) -> StageSpec:
    """Validate merged spec data; every failure becomes one `SpecError`."""
    kind = stage_kind(stage)
    try:
        spec = StageSpec.model_validate({**data, "stage": stage, "kind": kind})
    except ValidationError as err:
        raise _spec_error_from_validation(err, source) from None
    broken = check_invariants(spec)
    if broken:
        path, message = broken[0]
        file, line = source.locate(tuple(path.split(".")))
        raise SpecError(file=file, field=path, message=message, line=line)
    return spec


def check_stage_name(stage: str, where: Path | str) -> None:
    """Stage names become file names and resource names: a DNS label, never a path."""
    if len(stage) > MAX_DNS_LABEL or not DNS_LABEL.fullmatch(stage):
        raise SpecError(file=where, field="", message=f"'{excerpt(stage)}' is not a stage name: lowercase letters, "
                                                      f"digits and '-', starting with a letter, at most {MAX_DNS_LABEL} "
                                                      "characters")
    if stage == "base":
        raise SpecError(file=where, field="", message="'base' is not a stage: base.yaml holds the defaults every stage "
                                                      "shares")


def stage_file(stage: str, environments: Optional[Path] = None) -> Path:
    environments = environments or environments_dir()
    check_stage_name(stage, environments)
    file = environments / f"{stage}.yaml"
    if not file.is_file():
        known = sorted(path.stem for path in environments.glob("*.yaml") if path.stem != "base")
        raise SpecError(file=file, field="", message=f"no stage '{stage}'; stages here: {', '.join(known) or 'none'}")
    return file


def load_stage(stage: str, environments: Optional[Path] = None, overrides: Optional[dict] = None,
               source_stage: Optional[str] = None) -> StageSpec:
    """Load `base.yaml` merged under the stage file (or `source_stage`'s file), plus optional overrides; build
    contexts are those of the project `environments` belongs to."""
    environments = environments or environments_dir()
    base = load_yaml_source(environments / "base.yaml")
    own = load_yaml_source(stage_file(source_stage or stage, environments))
    source = base.under(own)
    data = deep_merge(base.data, own.data)
    if overrides:
        data = deep_merge(data, overrides)
    with working_on(project_of(environments)):
        return build_spec(stage, data, source)


def check_shared_host_ports(specs: list[StageSpec], environments: Optional[Path] = None) -> None:
    """Host ports must be unique across every stage that shares a Docker host."""
    environments = environments or environments_dir()
    claimed: dict[tuple[str, str, int], str] = {}
    for spec in specs:
        for path, port in spec.published_ports().items():
            if port.host_port is None:
                continue
            key = (spec.docker.url, port.bind_address, port.host_port)
            owner = claimed.get(key)
            if owner is not None:
                source = load_yaml_source(environments / "base.yaml").under(load_yaml_source(stage_file(spec.stage, environments)))
                field = f"{path}.host_port"
                file, line = source.locate(tuple(field.split(".")))
                raise SpecError(file=file, field=field, line=line,
                                message=f"host port {port.host_port} on {spec.docker.url} is already used by {owner}; "
                                        "ports must be unique across stages sharing a Docker host")
            claimed[key] = f"{spec.stage}.{path}"


def load_stages(stages: list[str], environments: Optional[Path] = None) -> list[StageSpec]:
    """Load several stages and check the cross-stage invariants among all shipped stages."""
    environments = environments or environments_dir()
    specs = {stage: load_stage(stage, environments) for stage in stages}
    for stage in SHIPPED_STAGES:
        if stage not in specs and stage_file(stage, environments).is_file():
            specs[stage] = load_stage(stage, environments)
    check_shared_host_ports(list(specs.values()), environments)
    return [specs[stage] for stage in stages]
