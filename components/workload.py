"""The workload contract: what a component runs, said once, whatever runs it.

A component describes each of its workloads as a `Workload` (image, port, health check, limits, environment,
secrets, volumes, publishing, replicas, placement role, labels); a runtime (components/runtimes.py) renders
it: as `docker.Container`s on a single host, as a `docker.Service` on a swarm, and as the `docker run` or
`docker service create` of a run the CLI starts itself (`mlops train`, `mlops data`). The hardening every
workload gets is the constants below, rendered by each runtime as far as it can express them
(docs/contracts.md).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence, Union

import pulumi

from mlops_spec.contract import COMPONENT_LABEL, TlsEnv
from mlops_spec.models import HealthCheck, Limits, PublishedPort
from mlops_spec.service_tls import ServerTls, server_tls

APP_USER = "10001:10001"
APP_UID, APP_GID = APP_USER.split(":")
READ_ONLY_ROOT = True
DROPPED_CAPABILITIES = ("ALL",)
SECURITY_OPTIONS = ("no-new-privileges:true",)
# No /dev/shm at all, so /tmp stays the only writable path besides volumes (docs/contracts.md), and no IPC
# namespace shared with anything. Checked with every image: nginx, uvicorn (oip), MLServer, MLflow, the
# registry and a scikit-learn training run (joblib warns it runs serially, as training's n_jobs=1 does
# anyway; same model sha256) work without it. The engine reads it back as "none".
IPC_MODE = "none"
# pulumi-docker 5.2.0's Container has no pids_limit (the cgroup pids controller, `docker run --pids-limit`),
# so the nearest guard it offers is RLIMIT_NPROC. That counts the processes and threads of the user on the
# whole host, not per container, and every container runs as uid 10001: the limit bounds all uid-10001
# containers of all stacks on a host together. A fork bomb in one container then stops at PROCESS_LIMIT
# tasks instead of exhausting the host's PIDs (32768 here), though until it is killed the other uid-10001
# containers cannot start threads either. A stage at rest runs about 30 such tasks (measured: MLflow 14, the
# registry 5, the gateway 3, an oip replica 6, an MLServer one 12); 4096 leaves room for many stages and
# experiments on one host, and their training runs.
PROCESS_LIMIT = 4096
TMP_PATH = "/tmp"
TMP_OPTIONS = "rw,noexec,nosuid"
TMP_MB = 64
SECRETS_DIR = "/run/secrets"
SECRET_FILE_MODE = 0o400


class Role(enum.Enum):
    """Where a workload's tasks run on a swarm and how they are rolled; one host runs them all."""

    STATEFUL = "stateful"
    """One task on the stateful node, where its volumes live; the old task stops before the new one opens them."""
    SPREAD = "spread"
    """`replicas` tasks spread over the nodes the stage's constraints allow, each new task started first."""
    EDGE = "edge"
    """One task on every edge node; stopped first, as its host port cannot be held twice on a node."""


@dataclass(frozen=True)
class SecretEnv:
    """A secret the workload reads from the file `/run/secrets/<file>` that the variable `<VARIABLE>_FILE`
    names: on a swarm a Swarm secret, on one host a file in a volume of the workload's own (or of the one-off
    run's). The images read the variable itself too, for whoever runs them by hand."""

    value: pulumi.Input[str]
    resource_name: str
    """Of its `docker.Secret` on a swarm; workloads that name the same one share it."""
    purpose: str
    """Names the Swarm secret, `<stack>-<purpose>-<hash>`."""
    file: str

    def file_variable(self, key: str) -> tuple[str, str]:
        """The variable the workload gets in place of `key`, and the path it names."""
        return f"{key}_FILE", f"{SECRETS_DIR}/{self.file}"


PerReplica = Callable[[str], str]
"""A value that differs per replica, from the replica's name (on a swarm, the task name's Go template)."""
EnvValue = Union[pulumi.Input[str], SecretEnv, PerReplica]


@dataclass(frozen=True)
class ServiceTls:
    """What a service published off loopback speaks TLS with (mlops_spec/service_tls.py), derived inside its
    secret: the certificate and its CA are public, the key stays a secret."""

    server: pulumi.Output[ServerTls]

    @classmethod
    def off_loopback(cls, port: PublishedPort, secret: pulumi.Input[str], stack: str, service: str,
                     names: Sequence[str]) -> Optional["ServiceTls"]:
        """The TLS of `service`, named `names` (and loopback), where `port` is published off loopback; None on
        loopback, where it speaks plain HTTP."""
        if not port.off_loopback:
            return None
        return cls(pulumi.Output.secret(secret).apply(lambda value: server_tls(value, stack, service, tuple(names))))

    def env(self, name: str, purpose: str) -> dict[str, EnvValue]:
        """The certificate and key for the service's container (images/mlflow/start.py, images/registry/entrypoint.sh)."""
        return {TlsEnv.CERTIFICATE: pulumi.Output.unsecret(self.server.apply(lambda server: server.certificate)),
                TlsEnv.KEY: SecretEnv(self.server.apply(lambda server: server.key), resource_name=f"{name}-tls-key",
                                      purpose=f"{purpose}-tls-key", file=f"{purpose}-tls-key")}

    @property
    def ca_certificate(self) -> pulumi.Output[str]:
        return pulumi.Output.unsecret(self.server.apply(lambda server: server.ca_certificate))


@dataclass(frozen=True)
class VolumeMount:
    volume: pulumi.Input[str]
    target: str
    read_only: bool = False


@dataclass(frozen=True)
class HttpHealth:
    """A health check that asks `path` on `port` over HTTP; any answer below 500 is alive."""

    port: int
    path: str
    check: HealthCheck
    tls: bool = False
    """The port speaks TLS (mlops_spec/service_tls.py)."""


@dataclass(frozen=True)
class Publish:
    port: int
    """The workload's port."""
    on: PublishedPort
    """The host port and address it is published on."""


@dataclass(frozen=True)
class Workload:
    resource_name: str
    name: str
    """The container's or service's name, which it is reached by on the stage network."""
    component: str
    """Its `mlops.component` label."""
    image: pulumi.Input[str]
    limits: Limits
    health: HttpHealth
    role: Role
    replicas: int = 1
    """Tasks of a SPREAD workload (containers `<name>-<index>` on one host); others run one."""
    wait_healthy: bool = True
    """`pulumi up` waits until it runs healthy, and so do the resources that depend on it."""
    env: Mapping[str, EnvValue] = field(default_factory=dict)
    volumes: Sequence[VolumeMount] = ()
    tmp_mb: int = TMP_MB
    publish: Optional[Publish] = None
    labels: Mapping[str, str] = field(default_factory=dict)
    """Labels of its own beyond the stage's, which may change for the life of the workload (a model pin)."""
    identity: Mapping[str, str] = field(default_factory=dict)
    """Labels of its own that never change for its life (a slot)."""
    aliases: Sequence[str] = ()
    """Further names on a single host's stage network."""
    depends_on: Sequence[pulumi.Resource] = ()


def http_probe(health: HttpHealth) -> list[str]:
    """An HTTP probe that needs nothing but the base image's python3; any answer below 500 is alive. Over TLS it
    does not verify the certificate: it asks the container's own port, to learn whether the server answers."""
    if health.tls:
        probe = ("import ssl,sys,urllib.request,urllib.error\n"
                 "try: urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2]), "
                 "context=ssl._create_unverified_context())\n")
    else:
        probe = ("import sys,urllib.request,urllib.error\n"
                 "try: urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2]))\n")
    probe += ("except urllib.error.HTTPError as e: sys.exit(e.code >= 500)\n"
              "except Exception: sys.exit(1)")
    return ["CMD", "python3", "-c", probe, f"{'https' if health.tls else 'http'}://127.0.0.1:{health.port}{health.path}",
            str(health.check.timeout_s)]


def healthy_within_s(check: HealthCheck) -> int:
    """How long `pulumi up` waits for a new container to turn healthy: the start period, then every retry
    failing at its timeout, plus one more interval and a margin for the engine."""
    return check.start_period_s + (check.retries + 1) * (check.interval_s + check.timeout_s) + 30


def component_labels(labels: Mapping[str, str], component: str) -> list[tuple[str, str]]:
    return sorted({**labels, COMPONENT_LABEL: component}.items())


@dataclass(frozen=True)
class Run:
    """A one-off run the CLI starts itself (`mlops train`, `mlops data`): a workload without health check,
    restarts or published port, hardened like every other and removed when it ends."""

    component: str
    image: str
    entrypoint: Sequence[str]
    """What runs, in place of the image's ENTRYPOINT."""
    args: Sequence[str]
    limits: Limits
    labels: Mapping[str, str]
    """The stage's labels."""
    network: str
    name: Optional[str] = None
    env: Mapping[str, Union[str, SecretEnv]] = field(default_factory=dict)
    """A secret's `resource_name` names the Swarm secret a job reads it from."""
    volumes: Sequence[VolumeMount] = ()
    gpus: bool = False
    """All of the host's GPUs (one host; a swarm job reserves `generic_resources` instead)."""
    interactive: bool = False
    """Standard input goes to the run."""
    constraints: Sequence[str] = ()
    generic_resources: Mapping[str, int] = field(default_factory=dict)
    """Placement of a swarm job: it lands only on a node with these free."""

    def secrets(self) -> dict[str, SecretEnv]:
        return {key: value for key, value in self.env.items() if isinstance(value, SecretEnv)}
