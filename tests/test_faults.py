"""Faults on the real engine, with what survives measured (docs/reliability.md, "Faults").

- MLflow is down when a serving replica starts: the replica retries, is not ready meanwhile, and turns
  ready once MLflow answers again;
- the disk holding MLflow's artifacts fills up while a training run or a model copy writes to it: one
  clear error, and no model version registered;
Each test prints what it measured (run pytest with -s to see it).
"""
from __future__ import annotations

import os
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from mlops.spec import REPO_ROOT

from mlops.credentials import PROMOTER, TRAINER, derived_password
from mlops.modelstore import BasicAuth, MlflowStore, ModelVersion, StoreError
from tests.test_gateway_failover import ModelSource, docker, engine, start_model_source, start_replica  # noqa: F401

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


@pytest.fixture(scope="module")
def model_source(engine) -> ModelSource:
    """The stage's MLflow image on its network (and the images, built once for the module)."""
    return start_model_source(engine)


# -- MLflow down when a replica starts -------------------------------------------------------------------

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
    print(f"\nMLflow down {waited_s:.1f} s while the replica retried {logs(replica).count('not reachable yet')} times; "
          f"after MLflow's start: MLflow healthy {mlflow_s:.1f} s, replica ready {ready_s:.1f} s, "
          f"healthy {time.monotonic() - started:.1f} s")
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
                          "-e", f"MLOPS_MLFLOW_PASSWORD={secret}", ready_path="/health", port=5000)
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
    subprocess.run([str(REPO_ROOT / "scripts" / "fetch-wheels.sh"), "images/training"], cwd=REPO_ROOT, check=True,
                   capture_output=True)
    image = f"{engine.prefix}-training:test"
    docker("build", "-q", "-t", image, "--build-arg", "BASE_IMAGE=mlops-base:bookworm", str(REPO_ROOT / "images" / "training"))
    engine.images.append(image)
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
    import pickle

    from sklearn.datasets import load_iris
    from sklearn.tree import DecisionTreeClassifier

    return pickle.dumps(DecisionTreeClassifier(random_state=0).fit(*load_iris(return_X_y=True)))
