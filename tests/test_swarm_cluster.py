"""The swarm stage (environments/cluster.yaml) on a real three-node Docker Swarm of inner engines.

The cluster (tests/cluster.py, the `swarm_cluster` session fixture) has node-1 as manager, stateful and
edge node, node-2 and node-3 as workers. The stage is rendered by the real program and made to exist by
tests/engine.py, which creates and updates services the way the provider does; the nodes pull the
workload images from the stage's own registry, a service on node-1. The model comes from `mlops train`
on the cluster. Tests run in file order on one deployment: serve, lose a node, roll forward, roll back,
split between blue and green.
"""
from __future__ import annotations

import http.client
import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import yaml
from sklearn.datasets import load_iris

from mlops.credentials import MLFLOW_PASSWORD, READER, REGISTRY_PASSWORD, derived_password, secret_variable
from mlops.modelstore import BasicAuth, MlflowStore
from mlops.spec import ENVIRONMENTS_DIR, REPO_ROOT, load_stage
from tests.engine import SERVICE, DeployFailed, StageOnEngine

pytestmark = pytest.mark.docker

STAGE = "cluster"
MODEL = "iris-classifier"
MLFLOW_PORT, REGISTRY_PORT, GATEWAY_PORT = 5300, 5301, 8380
SERVING = f"{STAGE}-serving-blue"
ROWS = load_iris().data[::10]
INFER_BODY = json.dumps({"inputs": [{"name": "input-0", "shape": list(ROWS.shape), "datatype": "FP64",
                                     "data": ROWS.ravel().tolist()}]}).encode()


class SteadyLoad:
    """Requests through the gateway one after another for as long as the `with` block runs, each on a
    fresh connection (so a request never rides a connection the gateway closed), counted by outcome."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.outcomes: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "SteadyLoad":
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def lost(self) -> int:
        return sum(count for outcome, count in self.outcomes.items() if outcome != "200")

    @property
    def total(self) -> int:
        return sum(self.outcomes.values())

    def _run(self) -> None:
        while not self._stop.is_set():
            connection = http.client.HTTPConnection(self.host, GATEWAY_PORT, timeout=10)
            try:
                connection.request("POST", f"/v2/models/{MODEL}/infer", body=INFER_BODY,
                                   headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                self.outcomes[str(response.status)] += 1
            except OSError as error:
                self.outcomes[type(error).__name__] += 1
            finally:
                connection.close()


def infer(host: str) -> list:
    connection = http.client.HTTPConnection(host, GATEWAY_PORT, timeout=30)
    connection.request("POST", f"/v2/models/{MODEL}/infer", body=INFER_BODY, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200, response.read()
    return json.loads(response.read())["outputs"][0]["data"]


def edit_stage(environments: Path, changes: dict) -> None:
    file = environments / f"{STAGE}.yaml"
    data = yaml.safe_load(file.read_text())
    for key, value in changes.items():
        data[key] = {**data.get(key, {}), **value}
    file.write_text(yaml.safe_dump(data, sort_keys=False))


def train(environments: Path, subset: str) -> dict[str, str]:
    result = subprocess.run([sys.executable, "-m", "mlops", "train", "--stage", STAGE, "--subset", subset,
                             "--environments", str(environments)], capture_output=True, text=True, timeout=900,
                            cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    registered = result.stdout.strip().splitlines()[-1]
    assert registered.startswith("REGISTERED "), result.stdout
    return dict(field.split("=", 1) for field in registered.split()[1:])


@pytest.fixture(scope="module")
def cluster_stage(swarm_cluster, tmp_path_factory):
    """The cluster stage deployed on the swarm, with two model versions trained on it and version 1 pinned;
    yields (engine, environments, {version: registered fields}, reader)."""
    for lock in sorted(REPO_ROOT.glob("images/*/requirements.lock")):
        subprocess.run([str(REPO_ROOT / "scripts" / "fetch-wheels.sh"), str(lock.parent.relative_to(REPO_ROOT))],
                       cwd=REPO_ROOT, check=True, capture_output=True)
    environments = tmp_path_factory.mktemp("swarm") / "environments"
    shutil.copytree(ENVIRONMENTS_DIR, environments)
    manager = swarm_cluster.manager
    edit_stage(environments, {"docker": {"url": manager.url},
                              "swarm": {"registry_address": f"{manager.ip}:{REGISTRY_PORT}"}})
    secrets = {secret_variable(REGISTRY_PASSWORD, STAGE): uuid.uuid4().hex,
               secret_variable(MLFLOW_PASSWORD, STAGE): uuid.uuid4().hex}
    saved = {variable: os.environ.get(variable) for variable in secrets}
    os.environ.update(secrets)
    engine = StageOnEngine(stack=STAGE, spec=load_stage(STAGE, environments),
                           registry_password=secrets[secret_variable(REGISTRY_PASSWORD, STAGE)],
                           mlflow_password=secrets[secret_variable(MLFLOW_PASSWORD, STAGE)])
    try:
        engine.deploy()
        versions = {1: train(environments, "0.5"), 2: train(environments, "0.7")}
        assert versions[1]["sha256"] != versions[2]["sha256"]
        pin(engine, environments, version=1, sha256=versions[1]["sha256"])
        swarm_cluster.wait_running(SERVING, engine.spec.serving.replicas, timeout_s=300)
        yield engine, environments, versions, BasicAuth(READER, derived_password(engine.mlflow_password, READER))
    finally:
        engine.teardown()
        for variable, value in saved.items():
            os.environ.pop(variable, None)
            if value is not None:
                os.environ[variable] = value


def pin(engine: StageOnEngine, environments: Path, version: int, sha256: str) -> None:
    """Pin a model in the stage file and deploy it, as `pulumi up` of the edited file would."""
    edit_stage(environments, {"release": {"model": {"name": MODEL, "version": version, "sha256": sha256}}})
    engine.spec = load_stage(STAGE, environments)
    engine.deploy()


def predictions_of(reader: BasicAuth, manager_ip: str, version: int) -> list:
    model = MlflowStore(f"http://{manager_ip}:{MLFLOW_PORT}", reader).fetch(MODEL, version)
    return pickle.loads(model.files["model.pkl"]).predict(ROWS).tolist()


def serving_env(engine: StageOnEngine) -> dict[str, str]:
    spec = engine.client.api.inspect_service(SERVING)["Spec"]["TaskTemplate"]["ContainerSpec"]
    return dict(variable.split("=", 1) for variable in spec["Env"])


def wait_update_state(engine: StageOnEngine, wanted: str, timeout_s: float, service: str = SERVING) -> None:
    deadline = time.monotonic() + timeout_s
    while (state := (engine.client.api.inspect_service(service).get("UpdateStatus") or {}).get("State")) != wanted:
        assert time.monotonic() < deadline, f"{service}: update state {state}, not {wanted}, after {timeout_s:.0f}s"
        time.sleep(1)


def test_the_stage_deploys_from_the_rendering_and_serves_the_model_from_several_nodes(swarm_cluster, cluster_stage):
    engine, _, _, reader = cluster_stage
    declared = {resource.inputs["name"] for resource in engine.resources() if resource.type == SERVICE}
    running = {service.name for service in engine.client.services.list(filters={"label": f"mlops.stack={STAGE}"})}
    assert running == declared and SERVING in declared
    nodes = swarm_cluster.nodes_running(SERVING)
    assert len(nodes) == engine.spec.serving.replicas and len(set(nodes)) >= 2, nodes
    # Every replica runs the serving image by digest from the stage's registry, pulled by its node.
    image = engine.client.api.inspect_service(SERVING)["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]
    assert image.startswith(f"{swarm_cluster.manager.ip}:{REGISTRY_PORT}/{STAGE}/serving") and "@sha256:" in image
    assert infer(swarm_cluster.manager.ip) == predictions_of(reader, swarm_cluster.manager.ip, 1)


def test_a_node_power_cut_loses_at_most_one_percent_and_the_replicas_come_back(swarm_cluster, cluster_stage):
    engine, _, _, _ = cluster_stage
    replicas = engine.spec.serving.replicas
    victim = next(name for name in swarm_cluster.nodes_running(SERVING) if name != swarm_cluster.manager.name)
    try:
        with SteadyLoad(swarm_cluster.manager.ip) as load:
            time.sleep(3)
            swarm_cluster.node(victim).stop()
            swarm_cluster.wait_running(SERVING, replicas, timeout_s=120, avoiding=victim)
            time.sleep(5)
    finally:
        swarm_cluster.node(victim).start()
        swarm_cluster.wait_nodes_ready(timeout_s=120)
    assert load.total >= 50, load.outcomes
    assert load.lost <= load.total / 100, load.outcomes


def test_a_rolling_update_to_a_new_model_version_loses_no_request(swarm_cluster, cluster_stage):
    engine, environments, versions, reader = cluster_stage
    with SteadyLoad(swarm_cluster.manager.ip) as load:
        pin(engine, environments, version=2, sha256=versions[2]["sha256"])
        wait_update_state(engine, "completed", timeout_s=600)
    assert load.total >= 50 and load.lost == 0, load.outcomes
    assert serving_env(engine)["MODEL_VERSION"] == "2"
    swarm_cluster.wait_running(SERVING, engine.spec.serving.replicas, timeout_s=60)
    assert infer(swarm_cluster.manager.ip) == predictions_of(reader, swarm_cluster.manager.ip, 2)


def test_a_model_that_fails_its_sha256_pin_is_rolled_back_while_the_old_one_answers(swarm_cluster, cluster_stage):
    engine, environments, versions, reader = cluster_stage
    with SteadyLoad(swarm_cluster.manager.ip) as load:
        # Version 1 pinned with version 2's digest: the new replica refuses the model and never gets ready,
        # Swarm rolls the service back, and the deploy fails saying so, as `pulumi up` would.
        with pytest.raises(DeployFailed, match="rollback completed"):
            pin(engine, environments, version=1, sha256=versions[2]["sha256"])
        wait_update_state(engine, "rollback_completed", timeout_s=60)
    assert load.total >= 50 and load.lost == 0, load.outcomes
    assert serving_env(engine)["MODEL_VERSION"] == "2"
    assert infer(swarm_cluster.manager.ip) == predictions_of(reader, swarm_cluster.manager.ip, 2)


def test_no_service_holds_a_password_in_its_environment(swarm_cluster, cluster_stage):
    engine, _, _, _ = cluster_stage
    passwords = [engine.registry_password, engine.mlflow_password,
                 *(derived_password(engine.mlflow_password, identity) for identity in (READER, "trainer", "promoter"))]
    services = engine.client.services.list(filters={"label": f"mlops.stack={STAGE}"})
    assert services
    for service in services:
        inspected = subprocess.run(["docker", "-H", swarm_cluster.url, "service", "inspect", service.name],
                                   capture_output=True, text=True, check=True).stdout
        env = json.loads(inspected)[0]["Spec"]["TaskTemplate"]["ContainerSpec"].get("Env", [])
        assert not [password for password in passwords if password in inspected], service.name
        assert not [variable for variable in env if "PASSWORD=" in variable], (service.name, env)


def test_the_gateway_splits_traffic_between_blue_and_green_replicas_on_several_nodes(swarm_cluster, cluster_stage):
    engine, environments, versions, _ = cluster_stage
    green = f"{STAGE}-serving-green"
    # Blue back on the pin that serves (the rollback test left a refused one in the file), green on version 1.
    edit_stage(environments, {
        "release": {"model": {"name": MODEL, "version": 2, "sha256": versions[2]["sha256"]}},
        "serving": {"green": {"model": {"name": MODEL, "version": 1, "sha256": versions[1]["sha256"]}},
                    "traffic": {"blue": 50, "green": 50}}})
    engine.spec = load_stage(STAGE, environments)
    engine.deploy()
    swarm_cluster.wait_running(green, engine.spec.serving.replicas, timeout_s=300)
    assert len(set(swarm_cluster.nodes_running(green))) >= 2
    # The gateway (no converge_config: a global service) takes the new weights when Swarm has replaced its task.
    wait_update_state(engine, "completed", timeout_s=300, service=f"{STAGE}-gateway")
    deadline = time.monotonic() + 60
    while True:
        try:
            infer(swarm_cluster.manager.ip)
            break
        except (OSError, AssertionError):
            assert time.monotonic() < deadline, "the updated gateway does not answer"
            time.sleep(1)
    answered: Counter[tuple[str, int]] = Counter()
    for _ in range(200):
        connection = http.client.HTTPConnection(swarm_cluster.manager.ip, GATEWAY_PORT, timeout=30)
        connection.request("POST", f"/v2/models/{MODEL}/infer", body=INFER_BODY,
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        answered[(response.getheader("X-Gateway-Pool", "?"), response.status)] += 1
        connection.close()
    assert set(answered) == {("blue", 200), ("green", 200)}, answered
    assert 60 <= answered[("green", 200)] <= 140, answered
