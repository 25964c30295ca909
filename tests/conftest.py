"""Shared fixtures. Tests that need a real Docker engine take `docker_engine`."""
from __future__ import annotations

import os
import subprocess

import pytest

# The session's MLflow servers (`mlflow_executable`, `registries`), shared by every module that takes them.
pytest_plugins = ["tests.mlflow_servers"]

REQUIRE_DOCKER = os.environ.get("MLOPS_REQUIRE_DOCKER") == "1"


def free_port() -> int:
    """A port free on the loopback right now."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def private_copy_of_dev(name: str, ports: dict[str, int], models: tuple[str, ...] = ("iris-classifier",)) -> dict:
    """dev.yaml as stage file of a throw-away experiment `name`, on free host `ports` (`mlflow`, `gateway`, and
    `registry` for an image registry, which dev as shipped has not), declaring `models` (dev's) without a release: a
    test's own stage never touches a real one on the same engine, and builds the images of the models it trains
    only."""
    import yaml

    from mlops_spec.project import ENVIRONMENTS_DIR

    spec = yaml.safe_load((ENVIRONMENTS_DIR / "dev.yaml").read_text())
    assert set(models) <= set(spec["models"]), f"dev declares {sorted(spec['models'])}"
    return spec | {
        "experiment": {"name": name, "owner": "tests", "source_stage": "dev",
                       "created_at": "2026-01-01T00:00:00Z", "expires_at": "2026-01-01T01:00:00Z"},
        "model_registry": {"port": {"host_port": ports["mlflow"]}},
        "image_registry": {"enabled": True, "port": {"host_port": ports["registry"]}} if "registry" in ports
        else spec["image_registry"],
        "serving": {**spec["serving"], "port": {"host_port": ports["gateway"]}},
        "models": {model: {} for model in models},
    }

def fetch_build_inputs() -> None:
    """What the image builds install offline, as `make wheels` fetches it: the wheels of every hashed lock (the
    platform images' and the model projects') and the pinned Debian packages (images/prometheus). Quick when they
    are current."""
    from mlops_spec.project import REPO_ROOT

    for script, patterns in (("fetch-wheels.sh", ("images/*/requirements.lock", "models/*/requirements.lock")),
                             ("fetch-debs.sh", ("images/*/packages.lock",))):
        for found in sorted(path for pattern in patterns for path in REPO_ROOT.glob(pattern)):
            subprocess.run([str(REPO_ROOT / "scripts" / script), str(found.parent.relative_to(REPO_ROOT))],
                           cwd=REPO_ROOT, check=True, capture_output=True)


def _engine_answers() -> str | None:
    """None when the engine answers, else why not."""
    try:
        probe = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                               text=True, timeout=20)
    except FileNotFoundError:
        return "the docker command is not installed"
    except subprocess.TimeoutExpired:
        return "the Docker engine did not answer within 20 s"
    if probe.returncode != 0:
        return f"no Docker engine answers ({probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else 'docker info failed'})"
    return None


@pytest.fixture(scope="session")
def docker_engine() -> None:
    """Skips without an engine on a user's machine; under MLOPS_REQUIRE_DOCKER=1 (CI) that is a failure."""
    reason = _engine_answers()
    if reason is None:
        return
    if REQUIRE_DOCKER:
        pytest.fail(f"MLOPS_REQUIRE_DOCKER=1 but {reason}", pytrace=False)
    pytest.skip(f"needs a Docker engine: {reason}")


@pytest.fixture(autouse=True)
def engine_facts_without_an_engine(request):
    """A test without a Docker engine reads none: what the program reads from a stage's engine (a base image's ID,
    swap accounting; components/engine_facts.py) is NO_ENGINE's answer everywhere in the test, in renderings and
    in the content tags `mlops train` and `mlops promote` compute alike. Engine tests read the real engines."""
    from components.engine_facts import NO_ENGINE, reading_engines

    if request.node.get_closest_marker("docker") or "docker_engine" in request.fixturenames:
        yield
        return
    with reading_engines(lambda spec: NO_ENGINE):
        yield


# Test-fixture digests only: shipped specs never carry a digest nobody built.
FIXTURE_TRAINING_DIGEST = "sha256:" + "1" * 64
FIXTURE_SERVING_DIGEST = "sha256:" + "2" * 64
FIXTURE_MODEL_SHA256 = "3" * 64
# Each promoted stage pulls from its own registry (shipped ports: staging 5101, prod 5201).
REGISTRY_PORTS = {"dev": 5001, "staging": 5101, "prod": 5201}


def pinned_image(stage: str, role: str, digest: str) -> str:
    return f"localhost:{REGISTRY_PORTS[stage]}/{stage}/{role}@{digest}"


FIXTURE_MODEL = "iris-classifier"


def fixture_release(stage: str) -> dict:
    """iris-classifier's release as `mlops promote` pins it in `stage` (models.iris-classifier.release)."""
    return {"version": 4, "sha256": FIXTURE_MODEL_SHA256,
            "images": {"training": pinned_image(stage, f"{FIXTURE_MODEL}-training", FIXTURE_TRAINING_DIGEST),
                       "serving": pinned_image(stage, f"{FIXTURE_MODEL}-serving", FIXTURE_SERVING_DIGEST)}}


FIXTURE_TRAINING_IMAGE = pinned_image("prod", f"{FIXTURE_MODEL}-training", FIXTURE_TRAINING_DIGEST)
FIXTURE_SERVING_IMAGE = pinned_image("prod", f"{FIXTURE_MODEL}-serving", FIXTURE_SERVING_DIGEST)


@pytest.fixture
def environments(tmp_path):
    """A writable copy of environments/ for tests that edit specs."""
    import shutil

    from mlops_spec.project import ENVIRONMENTS_DIR

    copy = tmp_path / "environments"
    shutil.copytree(ENVIRONMENTS_DIR, copy)
    return copy


@pytest.fixture
def released_environments(environments):
    """environments/ as it looks after a release was promoted to staging and prod."""
    import yaml

    for stage in ("staging", "prod"):
        file = environments / f"{stage}.yaml"
        data = yaml.safe_load(file.read_text()) or {}
        data["models"][FIXTURE_MODEL]["release"] = fixture_release(stage)
        file.write_text(yaml.safe_dump(data, sort_keys=False))
    return environments


@pytest.fixture(scope="session")
def docker_hosts(docker_engine):
    """Separate Docker engines (tests/hosts.py): `docker_hosts("dev", "staging")` -> {name: DockerHost};
    `docker_hosts("prod", tls=True)` for engines that answer over TLS only.

    A host starts on first request and serves the rest of the session, since each costs seconds and a copy of
    the base image: a test leaves the hosts it used empty (`DockerHost.reset()`), and asking again starts any
    host a test stopped. A name is a TLS host or a plain one for the whole session. Names carry this session's
    id, so parallel sessions never collide."""
    import uuid

    from tests import hosts

    session = uuid.uuid4().hex[:12]
    started: dict[str, hosts.DockerHost] = {}

    def get(*names: str, tls: bool = False) -> dict[str, hosts.DockerHost]:
        missing = [name for name in dict.fromkeys(names) if name not in started]
        if missing:
            started.update(hosts.start_hosts(missing, network=f"mlops-hosts-{session}", session=session, tls=tls))
        for name in names:
            if (started[name].tls is not None) != tls:
                raise ValueError(f"host {name} was started {'with' if started[name].tls else 'without'} TLS this session")
            started[name].start()
        return {name: started[name] for name in names}

    yield get
    hosts.remove_hosts(session)


@pytest.fixture(scope="session")
def swarm_cluster(docker_engine):
    """A three-node Docker Swarm of inner engines (tests/cluster.py), built once per session and removed at
    its end, labelled as environments/cluster.yaml asks (`cluster.STAGE_NODE_LABELS`): node-1 is the manager.
    Names carry this session's id, so parallel sessions never collide."""
    import uuid

    from tests import cluster

    session = uuid.uuid4().hex[:12]
    try:
        yield cluster.start_cluster(session, labels=cluster.STAGE_NODE_LABELS)
    finally:
        cluster.remove_cluster(session)
