"""Faults on the real engine, with what survives measured (docs/reliability.md, "Faults").

- the Docker engine of a running dev stage loses power and comes back (an inner host of tests/hosts.py,
  never this machine's engine): every container comes back healthy, MLflow keeps every version and
  artifact, the image registry every image, and serving answers as before;
- MLflow is down when a serving replica starts: the replica retries, is not ready meanwhile, and turns
  ready once MLflow answers again;
- the disk holding MLflow's artifacts fills up while a training run or a model copy writes to it: one
  clear error, and no model version registered;
- the target's MLflow or image registry dies in the middle of `mlops promote`: the target spec file is
  unchanged, nothing half-copied is registered or pinned, and a rerun completes.

The power cut uses the session's inner `dev` host, as tests/test_multi_host.py does: in one session, the
images and build cache it leaves there (`DockerHost.reset` keeps them) make that module's builds cache hits.
Each test prints what it measured (run pytest with -s to see it).
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import os
import pickle
import shutil
import signal
import ssl
import time
import urllib.error
import urllib.request
import uuid

import pytest
import yaml
from sklearn.datasets import load_iris
from sklearn.tree import DecisionTreeClassifier
from typer.testing import CliRunner

from components.model_registry import mlflow_password_hashes
from mlops import promote
from mlops.cli import app
from mlops.imagecopy import StageRegistry, manifest_digest, read_manifest
from mlops.modelstore import BasicAuth, MlflowStore, ModelVersion, StoreError
from mlops_spec.contract import (
    MLFLOW_PASSWORD,
    PROMOTER,
    READER,
    REGISTRY_PASSWORD,
    SECRET_FILES_SUFFIX,
    TRAINER,
    derived_password,
    secret_variable,
)
from mlops_spec.loading import load_stage
from mlops_spec.project import ENVIRONMENTS_DIR
from mlops_spec.service_tls import ca_certificate
from tests.conftest import fetch_build_inputs
from tests.engine import StageOnEngine
from tests.mlflow_servers import MLFLOW_SECRETS, start_server, wait_healthy
from tests.test_gateway_failover import ModelSource, docker, engine, start_model_source, start_replica  # noqa: F401
from tests.test_multi_host import PUBLISHED, edit_stage, infer, mlops
from tests.test_promote import (  # noqa: F401
    dev_and_staging,
    give_stage_secrets,
    image_registries,
    image_registry,
    make_repo,
    register_source_model,
    release_yaml,
)
from tests.test_training_image import build_model_image

pytestmark = pytest.mark.docker

MODEL_NAME = "iris-classifier"
MIB = 1024 * 1024


def answers(url: str) -> int | None:
    """The HTTP status `url` answers from here, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def wait_until(condition, timeout_s: float, what: str) -> float:
    """Seconds until `condition()` held; fails the test after `timeout_s`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            pytest.fail(f"{what} did not happen within {timeout_s:.0f} s")
        time.sleep(0.25)
    return time.monotonic() - started


def logs(container: str) -> str:
    shown = docker("logs", container, check=False)
    return shown.stdout + shown.stderr


# -- the engine loses power while a stage runs ----------------------------------------------------------

@pytest.fixture(scope="module")
def dev_on_its_host(docker_hosts, tmp_path_factory):
    """dev deployed on an inner host and trained once: (the host, the registry password)."""
    host = docker_hosts("dev")["dev"]
    environments = tmp_path_factory.mktemp("faults") / "environments"
    shutil.copytree(ENVIRONMENTS_DIR, environments)
    edit_stage(environments, "dev", {
        "docker": {"url": host.url, "insecure": True},  # the inner host speaks plain text (tests/hosts.py)
        "model_registry": {"port": {"host_port": 5000, **PUBLISHED}},
        # A dev with a registry of its own, as on a swarm: the power cut must lose none of its images.
        "image_registry": {"enabled": True, "port": {"host_port": 5001, **PUBLISHED}},
        "serving": {"port": {"host_port": 8080, **PUBLISHED}}})
    # dev serving the one model trained here (dev.yaml serves both shipped models).
    dev = yaml.safe_load((environments / "dev.yaml").read_text())
    dev["models"] = {MODEL_NAME: dev["models"][MODEL_NAME]}
    (environments / "dev.yaml").write_text(yaml.safe_dump(dev, sort_keys=False))
    registry_password, secret = uuid.uuid4().hex, uuid.uuid4().hex
    with pytest.MonkeyPatch.context() as environment:
        # As CI gives them to `mlops train`.
        environment.setenv(secret_variable(REGISTRY_PASSWORD, "dev"), registry_password)
        environment.setenv(secret_variable(MLFLOW_PASSWORD, "dev"), secret)
        try:
            StageOnEngine(stack="dev", spec=load_stage("dev", environments), registry_password=registry_password,
                          mlflow_password=secret).deploy()
            trained = mlops("train", "--stage", "dev", "--model", MODEL_NAME, "--subset", "0.5", "--environments",
                            str(environments))
            assert trained.returncode == 0, trained.stdout + trained.stderr
            yield host, registry_password
        finally:
            host.start()
            host.reset()


def registry_holdings(registry: StageRegistry) -> dict[str, str]:
    """Every `repository:tag` the registry lists, with its manifest digest; fails unless every blob and child
    manifest it names is there too."""
    tls = ssl.create_default_context(cadata=registry.ca_certificate) if registry.ca_certificate else None

    def get(path: str, method: str = "GET") -> bytes:
        request = urllib.request.Request(f"{'https' if tls else 'http'}://{registry.address}/v2/{path}", method=method,
                                         headers={"Authorization": "Basic " + base64.b64encode(
                                             f"{registry.username}:{registry.password}".encode()).decode()})
        with urllib.request.urlopen(request, timeout=30, context=tls) as response:
            return response.read()

    def check_complete(repository: str, reference: str) -> str:
        manifest = read_manifest(registry, repository, reference)
        document = json.loads(manifest)
        for child in document.get("manifests", []):
            check_complete(repository, child["digest"])
        for blob in [document["config"], *document["layers"]] if "layers" in document else []:
            get(f"{repository}/blobs/{blob['digest']}", method="HEAD")
        return "sha256:" + hashlib.sha256(manifest).hexdigest()

    return {f"{repository}:{tag}": check_complete(repository, tag)
            for repository in json.loads(get("_catalog"))["repositories"]
            for tag in json.loads(get(f"{repository}/tags/list"))["tags"] or []}


def models_held(store: MlflowStore) -> dict[int, str]:
    """Every version of the model with the sha256 of its `model.pkl` as downloaded, checked against its tag."""
    held = {}
    for version in range(1, store.latest_version(MODEL_NAME) + 1):
        model = store.fetch(MODEL_NAME, version)
        assert model.tags["sha256"] == model.sha256, f"v{version}'s model.pkl is not what was registered"
        held[version] = model.sha256
    return held


def stage_health(client) -> dict[str, str]:
    """The health of each container of the stage that runs (the writers of its secret files never do)."""
    return {container.name: container.attrs["State"].get("Health", {}).get("Status", container.status)
            for container in client.containers.list(all=True, filters={"label": "mlops.stack=dev"})
            if not container.name.endswith(SECRET_FILES_SUFFIX)}


def test_an_engine_power_cut_loses_nothing_and_the_stage_serves_again(dev_on_its_host):
    host, registry_password = dev_on_its_host
    serving = f"http://{host.ip}:8080"
    # Published off loopback, both speak TLS, verified with the CAs the stage's secrets make.
    secret = os.environ[secret_variable(MLFLOW_PASSWORD, "dev")]
    reader = MlflowStore(f"https://{host.ip}:5000", BasicAuth(READER, derived_password(secret, READER)),
                         ca_certificate=ca_certificate(secret, "dev", "model-registry"))
    registry = StageRegistry(where="dev's image registry", address=f"{host.ip}:5001", username="mlops",
                             password=registry_password,
                             ca_certificate=ca_certificate(registry_password, "dev", "image-registry"))
    rows = load_iris().data[::7]
    wait_until(lambda: set(stage_health(host.client).values()) == {"healthy"}, 300, "every container healthy")
    containers, models, images = stage_health(host.client), models_held(reader), registry_holdings(registry)
    assert models and images
    answered = infer(serving, MODEL_NAME, rows)

    host.stop()
    restarted = time.monotonic()
    host.start(timeout_s=120)
    engine_s = time.monotonic() - restarted

    def serves_as_before() -> bool:
        try:
            return infer(serving, MODEL_NAME, rows) == answered
        except OSError:
            return False

    serving_s = wait_until(serves_as_before, 300, "serving answering as before") + engine_s
    healthy_s = wait_until(lambda: stage_health(host.client) == containers, 300, "every container healthy") + serving_s
    print(f"\nengine power cut: engine answering {engine_s:.1f} s after the restart, serving {serving_s:.1f} s, "
          f"all {len(containers)} containers healthy {healthy_s:.1f} s; {len(models)} model versions and "
          f"{len(images)} images kept")
    assert models_held(reader) == models
    assert registry_holdings(registry) == images


# -- MLflow down when a replica starts -------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_source(engine) -> ModelSource:
    """The stage's MLflow image on its network (and the images, built once for the module)."""
    return start_model_source(engine)


def test_a_replica_started_while_mlflow_is_down_retries_unready_and_turns_ready_when_it_is_back(engine, model_source):
    source = model_source
    pin = source.mlflow.register(MODEL_NAME, small_model())
    registry = f"{engine.prefix}-model-registry"
    docker("stop", registry)
    replica = start_replica(engine, source, "serving-before-mlflow", pin)
    replica_ready = f"http://127.0.0.1:{engine.host_port(replica, 8080)}/v2/health/ready"

    waited_s = wait_until(lambda: logs(replica).count("not reachable yet") >= 3, 60, "three retries")
    assert answers(replica_ready) is None, "no HTTP server may answer before the model is loaded"
    assert engine.health(replica) == "starting"
    assert docker("inspect", "-f", "{{.State.Running}} {{.RestartCount}}", replica).stdout.split() == ["true", "0"]

    docker("start", registry)
    started = time.monotonic()
    mlflow_s = wait_until(lambda: engine.health(registry) == "healthy", 120, "MLflow turning healthy")
    ready_s = wait_until(lambda: answers(replica_ready) == 200, 120, "the replica turning ready") + mlflow_s
    wait_until(lambda: engine.health(replica) == "healthy", 30, "the replica turning healthy")
    print(f"\nMLflow down: the replica logged 3 retries in {waited_s:.1f} s, "
          f"{logs(replica).count('not reachable yet')} by the time it was ready; after MLflow's start: "
          f"MLflow healthy {mlflow_s:.1f} s, replica ready {ready_s:.1f} s, healthy {time.monotonic() - started:.1f} s")
    assert f"serving model {MODEL_NAME} v{pin[0]} sha256 {pin[1]}" in logs(replica)


# -- a full disk under MLflow's artifacts ------------------------------------------------------------------

@pytest.fixture(scope="module")
def full_artifact_store(engine, model_source):
    """A second MLflow, whose artifacts volume is a 4 MiB tmpfs: (its store as trainer, its tracking URI on the
    network, a function that fills the volume up or frees it, its MLflow secret)."""
    network = model_source.network
    artifacts = f"{engine.prefix}-small-artifacts"
    docker("volume", "create", "--driver", "local", "--opt", "type=tmpfs", "--opt", "device=tmpfs",
           "--opt", "o=size=4m,uid=10001,gid=10001", artifacts)
    engine.volumes.append(artifacts)
    secret = os.urandom(16).hex()
    registry = engine.run("full-model-registry", engine.build("images/mlflow"), "--network", network,
                          "-v", f"{engine.volume('full-mlflow-db')}:/data/db", "-v", f"{artifacts}:/data/artifacts",
                          "-e", f"MLOPS_MLFLOW_PASSWORD_HASHES={mlflow_password_hashes(secret, engine.prefix)}", ready_path="/health", port=5000)
    engine.wait_healthy(registry)

    def fill(full: bool) -> None:
        fill_up = "dd if=/dev/zero of=/data/filler bs=64k 2>/dev/null; true"
        docker("run", "--rm", "-v", f"{artifacts}:/data", "mlops-base:bookworm", "sh", "-c",
               fill_up if full else "rm -f /data/filler")

    store = MlflowStore(f"http://127.0.0.1:{engine.host_port(registry, 5000)}",
                        BasicAuth(TRAINER, derived_password(secret, TRAINER)))
    return store, f"http://{registry}:5000", fill, secret


def registered_versions(store: MlflowStore) -> list[dict]:
    return store._versions(MODEL_NAME)


def test_a_model_copy_that_fills_the_disk_fails_clearly_and_registers_nothing(full_artifact_store):
    store, _, fill, secret = full_artifact_store
    promoter = MlflowStore(store.url, BasicAuth(PROMOTER, derived_password(secret, PROMOTER)))
    model = ModelVersion(name=MODEL_NAME, version=7, files={"model.pkl": os.urandom(6 * MIB), "manifest.json": b"{}"},
                         tags={"sha256": ""}, metrics={"accuracy": 0.97})
    before = registered_versions(store)
    started = time.monotonic()
    with pytest.raises(StoreError) as refused:
        promoter.publish(model, {"sha256": model.sha256})
    print(f"\nmodel copy onto a full disk: failed after {time.monotonic() - started:.1f} s: {refused.value}")
    assert "failed to store model/model.pkl (6.0 MiB) with HTTP 500" in str(refused.value)
    assert "its artifact store may be full or not writable" in str(refused.value)
    assert registered_versions(store) == before
    assert promoter.find_version(MODEL_NAME, model.sha256) is None


def test_a_training_run_onto_a_full_disk_fails_clearly_and_registers_nothing(engine, full_artifact_store):
    store, tracking_uri, fill, secret = full_artifact_store
    fetch_build_inputs()
    # The model's training image, as a building stage runs it: the platform's runner around the project's code.
    platform_image, image = build_model_image(engine.prefix, MODEL_NAME, "training")
    engine.images += [image, platform_image]
    before = registered_versions(store)
    fill(full=True)
    started = time.monotonic()
    run = docker("run", "--rm", "--network", f"{engine.prefix}-net", "--user", "10001:10001", "--read-only",
                 "--tmpfs", "/tmp", "-e", f"MLFLOW_TRACKING_URI={tracking_uri}", "-e", f"MLFLOW_TRACKING_USERNAME={TRAINER}",
                 "-e", f"MLFLOW_TRACKING_PASSWORD={derived_password(secret, TRAINER)}", image, "--subset", "0.5",
                 check=False)
    error = run.stderr.strip().splitlines()[-1]
    print(f"\ntraining onto a full disk: exit {run.returncode} after {time.monotonic() - started:.1f} s: {error}")
    assert run.returncode == 1
    assert error == (f"error: registering at {tracking_uri} failed: MLflow answered HTTP 500 to every try to store "
                     "the model's files: its artifact store may be full or not writable (the MLflow server's log "
                     "says why); nothing was registered")
    assert registered_versions(store) == before

    fill(full=False)
    retried = docker("run", "--rm", "--network", f"{engine.prefix}-net", "--user", "10001:10001", "--read-only",
                     "--tmpfs", "/tmp", "-e", f"MLFLOW_TRACKING_URI={tracking_uri}",
                     "-e", f"MLFLOW_TRACKING_USERNAME={TRAINER}",
                     "-e", f"MLFLOW_TRACKING_PASSWORD={derived_password(secret, TRAINER)}", image, "--subset", "0.5")
    assert retried.stdout.strip().splitlines()[-1].startswith(f"REGISTERED name={MODEL_NAME} version=")


def small_model() -> bytes:
    return pickle.dumps(DecisionTreeClassifier(random_state=0).fit(*load_iris(return_X_y=True)))


# -- a target registry fails in the middle of `mlops promote` ---------------------------------------------

def on_call(monkeypatch, owner, name: str, nth: int, action, *, after: bool = False) -> None:
    """Runs `action` just before (or after) the `nth` call of `owner.name`: the test picks the moment to fail a
    registry; the product has no hook for it."""
    real = getattr(owner, name)
    calls = itertools.count(1)

    def wrapper(*args, **kwargs):
        at_nth = next(calls) == nth
        if at_nth and not after:
            action()
        result = real(*args, **kwargs)
        if at_nth and after:
            action()
        return result

    monkeypatch.setattr(owner, name, wrapper)


@pytest.fixture(scope="module")
def prod_mlflow(mlflow_executable, tmp_path_factory):
    """prod's own MLflow, which a test may kill and restart on the same port and data: (port, kill, restart)."""
    folder = tmp_path_factory.mktemp("prod-mlflow") / "server"
    secret = MLFLOW_SECRETS["target"]  # the secret the test_promote fixtures give prod
    running = [start_server(mlflow_executable, folder, secret)]
    port = running[0][1]

    def kill() -> None:
        os.killpg(running[0][0].pid, signal.SIGKILL)
        running[0][0].wait()

    def restart() -> None:
        running[0] = start_server(mlflow_executable, folder, secret, port)
        wait_healthy(running[0][0], port, folder)

    wait_healthy(running[0][0], port, folder)
    yield port, kill, restart
    with contextlib.suppress(ProcessLookupError):
        kill()


@pytest.fixture
def promotion_secrets(monkeypatch):
    give_stage_secrets(monkeypatch)


def promote_staging_to_prod(environments):
    return CliRunner().invoke(app, ["promote", "--from", "staging", "--to", "prod", "--environments", str(environments)])


@pytest.mark.parametrize("moment", ["images copied, model not yet", "model's run created, files uploading"])
def test_prods_mlflow_dying_midway_leaves_prod_yaml_unchanged_and_a_rerun_completes(
        promotion_secrets, tmp_path, registries, image_registries, prod_mlflow, monkeypatch, moment):
    port, kill, restart = prod_mlflow
    version, sha256 = register_source_model(registries, accuracy=0.97)
    environments = make_repo(tmp_path, staging_port=registries["source"], prod_port=port,
                             releases={MODEL_NAME: release_yaml(version, sha256)})
    prod_yaml = environments / "prod.yaml"
    before = prod_yaml.read_text()
    if moment == "images copied, model not yet":
        on_call(monkeypatch, promote, "copy_image", 2, kill, after=True)
    else:
        on_call(monkeypatch, MlflowStore, "_upload", 1, kill)

    failed = promote_staging_to_prod(environments)
    assert failed.exit_code == 1, failed.output
    assert "is not reachable" in failed.output and "prod.yaml is unchanged" in failed.output
    assert prod_yaml.read_text() == before
    assert sorted(path.name for path in environments.iterdir()) == sorted(path.name for path in ENVIRONMENTS_DIR.iterdir())

    restarted = time.monotonic()
    restart()
    back_s = time.monotonic() - restarted
    prod = MlflowStore(f"http://127.0.0.1:{port}", BasicAuth(READER, derived_password(MLFLOW_SECRETS["target"], READER)))
    assert prod.find_version(MODEL_NAME, sha256) is None, "a version registered before its files were copied"
    rerun = promote_staging_to_prod(environments)
    assert rerun.exit_code == 0, rerun.output
    print(f"\nprod's MLflow killed ({moment}): refused with {failed.output.strip()!r}; MLflow back {back_s:.1f} s "
          f"after its restart, the rerun took {time.monotonic() - restarted - back_s:.1f} s")
    pinned = load_stage("prod", environments).models[MODEL_NAME].release
    assert prod.fetch(MODEL_NAME, pinned.version).sha256 == pinned.sha256 == sha256


def test_the_target_image_registry_dying_between_the_image_copies_changes_nothing_and_a_rerun_completes(
        promotion_secrets, dev_and_staging, registries, monkeypatch):
    environments, pushed, (_, sha256), staging_port, staging_password = dev_and_staging
    [registry] = docker("ps", "--filter", f"publish={staging_port}", "--format", "{{.Names}}").stdout.split()
    on_call(monkeypatch, promote, "copy_image", 2, lambda: docker("stop", registry))
    staging_yaml = environments / "staging.yaml"
    before = staging_yaml.read_text()
    promote_dev = ["promote", "--from", "dev", "--to", "staging", "--model", MODEL_NAME, "--environments",
                   str(environments)]

    failed = CliRunner().invoke(app, promote_dev)
    assert failed.exit_code == 1, failed.output
    assert "staging's image registry" in failed.output and "is unreachable" in failed.output
    assert "staging.yaml is unchanged" in failed.output
    assert staging_yaml.read_text() == before
    staging_mlflow = MlflowStore(f"http://127.0.0.1:{registries['target']}",
                                 BasicAuth(READER, derived_password(MLFLOW_SECRETS["target"], READER)))
    assert staging_mlflow.find_version(MODEL_NAME, sha256) is None, "the model was copied before every image was"

    restarted = time.monotonic()
    docker("start", registry)
    target = StageRegistry(where="staging's image registry", address=f"127.0.0.1:{staging_port}", username="mlops",
                           password=staging_password)
    wait_until(lambda: answers(f"http://{target.address}/v2/") == 401, 60, "staging's image registry answering")
    back_s = time.monotonic() - restarted
    rerun = CliRunner().invoke(app, promote_dev)
    assert rerun.exit_code == 0, rerun.output
    print(f"\nstaging's image registry stopped before the second image copy: refused with {failed.output.strip()!r}; "
          f"registry back {back_s:.1f} s after its start, the rerun took {time.monotonic() - restarted - back_s:.1f} s")
    release = load_stage("staging", environments).models[MODEL_NAME].release
    for role in ("training", "serving"):
        digest = pushed[role][1].split("@")[1]
        assert getattr(release.images, role) == f"localhost:{staging_port}/staging/{MODEL_NAME}-{role}@{digest}"
        assert manifest_digest(target, f"staging/{MODEL_NAME}-{role}", digest) == digest
    assert staging_mlflow.fetch(MODEL_NAME, release.version).sha256 == sha256
