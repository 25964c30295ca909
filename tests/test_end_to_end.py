"""End to end on a real Docker engine: build -> train -> register -> serve the pin -> tamper -> refuse.

The stage is a private copy of dev (its own stage file with an `experiment:` block, its own free host
ports), so the test never touches a real dev, staging or prod stack on the same engine.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import replace

import docker
import numpy as np
import pytest
import yaml
from sklearn.datasets import load_iris

from mlops.modelstore import BasicAuth, MlflowStore, StoreError
from mlops.signing import check_signed, public_keys
from mlops_spec.contract import (
    MLFLOW_PASSWORD,
    MODEL_HASH_TAG,
    READER,
    SIGNATURE_TAG,
    TRAINER,
    derived_password,
    secret_variable,
)
from mlops_spec.loading import load_stages
from tests.conftest import fetch_build_inputs, free_port, private_copy_of_dev
from tests.engine import StageOnEngine
from tests.model_signing import TRUSTED_KEYS_PEM, ModelSigner
from tests.readback import differences

pytestmark = pytest.mark.docker



def http_json(url: str, body: dict | None = None, auth: BasicAuth | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json",
                                                              **({"Authorization": auth.header} if auth else {})})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


# What dev declares before its first training run: the model its images are built from, whose newest version it
# serves once there is one (until then its replicas wait, unpinned).
MODEL = "iris-classifier"
FOLLOW_THE_NEWEST = {"version": "latest"}


def write_stage(environments, stage: str, ports: dict[str, int], release: dict | None) -> None:
    spec = private_copy_of_dev(stage, ports)
    spec["serving"]["replicas"] = 2
    if release is not None:
        spec["models"][MODEL]["release"] = release
    (environments / f"{stage}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


@pytest.fixture
def stage_on_engine(docker_engine, environments, monkeypatch):
    fetch_build_inputs()
    stage = f"t-e2e-{uuid.uuid4().hex[:6]}"
    ports = {"mlflow": free_port(), "gateway": free_port()}
    write_stage(environments, stage, ports, release=FOLLOW_THE_NEWEST)
    engine = StageOnEngine(stack=stage, spec=load_stages([stage], environments)[0],
                           registry_password=uuid.uuid4().hex)
    # `mlops train` reads the stage's MLflow secret as CI provides it.
    monkeypatch.setenv(secret_variable(MLFLOW_PASSWORD, stage), engine.mlflow_password)

    def deploy(release: dict | None) -> StageOnEngine:
        """Update the stage to `release`, as a `pulumi up` of the edited stage file would."""
        write_stage(environments, stage, ports, release)
        engine.spec = load_stages([stage], environments)[0]
        engine.deploy()
        return engine

    yield stage, environments, ports, deploy, engine.mlflow_password
    engine.teardown()


def train(stage: str, environments, *args: str) -> dict[str, str]:
    result = subprocess.run([sys.executable, "-m", "mlops", "train", "--stage", stage, "--environments",
                             str(environments), *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    registered = result.stdout.strip().splitlines()[-1]
    assert registered.startswith("REGISTERED "), result.stdout
    return dict(field.split("=", 1) for field in registered.split()[1:])


def test_train_register_serve_and_refuse_a_tampered_model(stage_on_engine):
    stage, environments, ports, deploy, mlflow_password = stage_on_engine
    reader = BasicAuth(READER, derived_password(mlflow_password, READER))
    engine = deploy(release=FOLLOW_THE_NEWEST)
    assert engine.client.containers.get(f"{stage}-model-registry").attrs["State"]["Health"]["Status"] == "healthy"

    first = train(stage, environments, "--subset", "0.5")
    second = train(stage, environments, "--subset", "0.5")
    assert first["sha256"] == second["sha256"], "same inputs must give the same model bytes"
    assert (first["version"], second["version"]) == ("1", "2")

    assert second["name"] == MODEL
    pin = {"name": MODEL, "version": int(second["version"]), "sha256": second["sha256"]}
    engine = deploy(release={"version": pin["version"], "sha256": pin["sha256"]})
    # The experiment stage, created and then updated to the pin, as the provider's Read would store it.
    assert differences(engine) == []
    gateway = f"http://127.0.0.1:{ports['gateway']}"
    rows = load_iris().data[::10]
    response = http_json(f"{gateway}/v2/models/{pin['name']}/infer", {"inputs": [
        {"name": "input-0", "shape": list(rows.shape), "datatype": "FP64", "data": rows.ravel().tolist()}]})
    served = response["outputs"][0]["data"]

    artifact_url = (f"http://127.0.0.1:{ports['mlflow']}/api/2.0/mlflow/model-versions/get-download-uri"
                    f"?name={pin['name']}&version={pin['version']}")
    download_uri = http_json(artifact_url, auth=reader)["artifact_uri"]
    model_path = download_uri.split("mlflow-artifacts:/", 1)[1]
    with urllib.request.urlopen(urllib.request.Request(
            f"http://127.0.0.1:{ports['mlflow']}/api/2.0/mlflow-artifacts/artifacts/{model_path}/model.pkl",
            headers={"Authorization": reader.header}), timeout=30) as artifact:
        model = pickle.loads(artifact.read())
    assert served == model.predict(rows).tolist()
    assert np.asarray(served).shape == (len(rows),)

    # Tamper with the stored file the replicas load (the model's project asks for skops: its model.skops, which
    # the signed manifest hashes), then restart a replica: it must refuse and never become ready.
    engine.client.containers.run(
        "mlops-base:bookworm", remove=True, user="0",
        command=["sh", "-c", f"printf x >> /data/artifacts/{model_path}/model.skops"],
        volumes={f"{stage}-artifacts": {"bind": "/data/artifacts", "mode": "rw"}})
    replica = engine.client.containers.get(f"{stage}-{MODEL}-blue-0")
    replica.update(restart_policy={"Name": "no"})
    replica.restart()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        replica.reload()
        if replica.status == "exited":
            break
        time.sleep(1)
    assert replica.status == "exited" and replica.attrs["State"]["ExitCode"] != 0
    refusal = re.search(r"refusing model (\S+) v(\d+): model/model.skops has sha256 [0-9a-f]{64}, not the "
                        r"([0-9a-f]{64}) the signed manifest gives it", replica.logs().decode())
    assert refusal is not None, replica.logs().decode()[-2000:]
    manifest = http_json(f"http://127.0.0.1:{ports['mlflow']}/api/2.0/mlflow-artifacts/artifacts/{model_path}/"
                         "manifest.json", auth=reader)
    assert refusal.groups() == (MODEL, str(pin["version"]), manifest["outputs"]["skops"]["sha256"])


class WritesAMarkerWhenUnpickled:
    """A forged model: unpickling it runs code, which leaves MARKER behind."""
    MARKER = "/tmp/a-forged-model-ran"

    def __reduce__(self):
        return (exec, (f"open({self.MARKER!r}, 'w').close()",))


def wait_exited(container, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        container.reload()
        if container.status == "exited":
            return
        time.sleep(1)
    raise AssertionError(f"{container.name} still {container.status} after {timeout_s:.0f}s")


def test_a_version_a_writer_registers_without_the_stages_signature_is_never_unpickled(stage_on_engine):
    """A leaked writer password registers a new version, correctly tagged with its bytes' sha256; dev's MLflow
    refuses it signed with another key, so it goes in unsigned. dev's replicas follow the newest version, yet keep
    serving the newest signed one; a replica started pinned to the forged version refuses it and exits, and neither
    ever ran its code."""
    stage, environments, ports, deploy, mlflow_password = stage_on_engine
    engine = deploy(release=FOLLOW_THE_NEWEST)
    signed = train(stage, environments, "--subset", "0.5")
    store = MlflowStore(f"http://127.0.0.1:{ports['mlflow']}", BasicAuth(TRAINER, derived_password(mlflow_password, TRAINER)))
    genuine = store.fetch(MODEL, int(signed["version"]))
    check_signed(MODEL, genuine.version, genuine.tags, public_keys(TRUSTED_KEYS_PEM, "the session's"), "the session")

    forged_model = pickle.dumps(WritesAMarkerWhenUnpickled())
    manifest = json.loads(genuine.files["manifest.json"])
    manifest["outputs"]["model_sha256"] = hashlib.sha256(forged_model).hexdigest()
    forged_files = {"model.pkl": forged_model, "manifest.json": json.dumps(manifest).encode()}
    forged_tags = ModelSigner().tags(MODEL, forged_files["model.pkl"], forged_files["manifest.json"])
    with pytest.raises(StoreError, match="403"):
        store.publish(replace(genuine, files=forged_files, tags={}), forged_tags)
    del forged_tags[SIGNATURE_TAG]
    forged_version = store.publish(replace(genuine, files=forged_files, tags={}), forged_tags)
    assert forged_version == genuine.version + 1

    replica = engine.client.containers.get(f"{stage}-{MODEL}-blue-0")
    restarted_at = int(time.time())
    replica.restart()
    engine.wait_healthy([replica], timeout_s=120)
    logs = replica.logs(since=restarted_at).decode()
    assert f"serving model {MODEL} v{genuine.version} " in logs, logs
    assert f"v{forged_version}" in logs, "the replica says which version it passed over, and why"
    assert replica.exec_run(["test", "-e", WritesAMarkerWhenUnpickled.MARKER]).exit_code == 1

    environment = [variable for variable in replica.attrs["Config"]["Env"]
                   if not variable.startswith(("MODEL_VERSION=", "MODEL_SHA256="))]
    # A replica of the stage (its labels), started pinned to the forged version and left stopped once it refuses.
    pinned = engine.client.containers.run(
        replica.attrs["Config"]["Image"], detach=True, user=replica.attrs["Config"]["User"],
        labels=replica.attrs["Config"]["Labels"],
        network=replica.attrs["HostConfig"]["NetworkMode"], name=f"{stage}-forged-pin",
        volumes={mount["Name"]: {"bind": mount["Destination"], "mode": "ro"} for mount in replica.attrs["Mounts"]},
        environment=[*environment, f"MODEL_VERSION={forged_version}", f"MODEL_SHA256={forged_tags[MODEL_HASH_TAG]}"])
    try:
        wait_exited(pinned)
        log = pinned.logs().decode()
        assert pinned.attrs["State"]["ExitCode"] != 0, log
        assert f"v{forged_version}" in log and "signature" in log, log
        with pytest.raises(docker.errors.NotFound):
            pinned.get_archive(WritesAMarkerWhenUnpickled.MARKER)
        status = subprocess.run([sys.executable, "-m", "mlops", "status", stage, "--json", "--environments",
                                 str(environments)], capture_output=True, text=True, timeout=120)
        assert status.returncode == 1, status.stdout + status.stderr
        [refusal] = json.loads(status.stdout)["refusals"]
        assert refusal.startswith(f"{stage}-forged-pin: refusing model {MODEL} v{forged_version}: "), refusal
    finally:
        pinned.remove(force=True)
