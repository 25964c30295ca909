"""`mlops status` on a real stage: every published endpoint answers from the host, and a published port whose
engine proxy died is reported dead (exit 1) while the containers behind it stay healthy. The same deployment of a
dev copy, before any fault, is read back as the provider would read it (tests/readback.py)."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from sklearn.datasets import load_iris
from sklearn.tree import DecisionTreeClassifier

from mlops.modelstore import BasicAuth
from mlops_spec.contract import TRAINER, derived_password
from mlops_spec.loading import load_stages
from mlops_spec.project import ENVIRONMENTS_DIR, REPO_ROOT
from tests.conftest import free_port
from tests.engine import StageOnEngine
from tests.readback import differences
from tests.test_end_to_end import write_stage
from tests.test_gateway_failover import MlflowRest

MLOPS = [sys.executable, "-m", "mlops"]
SERVICES = ["gateway", "model registry", "image registry"]


@dataclass(frozen=True)
class Deployed:
    engine: StageOnEngine
    environments: Path
    ports: dict[str, int]

    def status(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*MLOPS, "status", self.engine.stack, "--environments", str(self.environments), *args],
                              capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)


@pytest.fixture(scope="module")
def deployed(docker_engine, tmp_path_factory):
    """A private dev-like stage on free host ports, with an image registry (which dev as shipped has not) so every
    kind of endpoint is probed, serving a registered model with two replicas."""
    for lock in sorted(REPO_ROOT.glob("images/*/requirements.lock")):
        subprocess.run([str(REPO_ROOT / "scripts" / "fetch-wheels.sh"), str(lock.parent.relative_to(REPO_ROOT))],
                       cwd=REPO_ROOT, check=True, capture_output=True)
    environments = tmp_path_factory.mktemp("status") / "environments"
    shutil.copytree(ENVIRONMENTS_DIR, environments)
    name = f"t-status-{uuid.uuid4().hex[:6]}"
    ports = {"mlflow": free_port(), "registry": free_port(), "gateway": free_port()}
    write_stage(environments, name, ports, release=None)
    engine = StageOnEngine(stack=name, spec=load_stages([name], environments)[0], registry_password=uuid.uuid4().hex)
    try:
        engine.deploy()
        mlflow = MlflowRest(f"http://127.0.0.1:{ports['mlflow']}",
                            BasicAuth(TRAINER, derived_password(engine.mlflow_password, TRAINER)))
        mlflow.post("registered-models/create", name="iris-classifier")
        version, sha256 = mlflow.register("iris-classifier", pickle.dumps(
            DecisionTreeClassifier(random_state=0).fit(*load_iris(return_X_y=True))))
        write_stage(environments, name, ports,
                    release={"version": int(version), "sha256": sha256})
        engine.spec = load_stages([name], environments)[0]
        engine.deploy()
        yield Deployed(engine, environments, ports)
    finally:
        engine.teardown()


def userland_proxies(host_port: int) -> list[int]:
    """PIDs of the engine's `docker-proxy ... -host-port N` processes for `host_port` (one per address family)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            arguments = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except OSError:
            continue
        if arguments and arguments[0].endswith(b"docker-proxy") and b"-host-port" in arguments:
            if arguments[arguments.index(b"-host-port") + 1] == str(host_port).encode():
                pids.append(int(entry.name))
    return pids


def rows(result: subprocess.CompletedProcess[str]) -> dict[str, dict]:
    return {row["service"]: row for row in json.loads(result.stdout)["rows"]}


@pytest.mark.docker
def test_the_provider_would_read_every_object_of_the_deployed_dev_stage_back_as_declared(deployed):
    """After a deploy and an update, the provider's Read of each container, volume and network stores what the
    rendering declares: the next `pulumi up` would change nothing."""
    assert {entry.type for entry in deployed.engine.state.values()} >= {
        "docker:index/container:Container", "docker:index/volume:Volume", "docker:index/network:Network"}
    assert differences(deployed.engine) == []


@pytest.mark.docker
def test_every_published_endpoint_answers_from_the_host(deployed):
    result = deployed.status("--json")
    assert result.returncode == 0, result.stdout + result.stderr
    answered = rows(result)
    assert list(answered) == SERVICES
    ports = {"gateway": "gateway", "model registry": "mlflow", "image registry": "registry"}
    for service, row in answered.items():
        assert row["ok"] and row["address"] == f"127.0.0.1:{deployed.ports[ports[service]]}", row
        assert 0 < row["latency_ms"] < 5000, row
    assert answered["gateway"]["answer"] == "GET /v2/health/ready: 200"
    assert answered["gateway"]["containers"] == "3/3 healthy"  # the gateway and two replicas
    assert answered["model registry"]["answer"] == "GET /health: 200"
    assert answered["image registry"]["answer"] == "GET /v2/: 401"  # the registry's answer to no credentials

    table = deployed.status()
    assert table.returncode == 0, table.stdout + table.stderr
    assert all(service in table.stdout for service in SERVICES) and "ok: every endpoint answers" in table.stdout


@pytest.mark.docker
def test_a_dead_published_port_fails_while_its_containers_stay_healthy(deployed):
    """What the engine's port proxy does when it exits (e.g. "too many open files"): the port stops answering
    and nothing inside the engine notices."""
    proxies = userland_proxies(deployed.ports["gateway"])
    assert proxies, ("no docker-proxy serves the gateway's port: this test needs the engine's userland proxy "
                     "(daemon.json \"userland-proxy\": true, the default)")
    for pid in proxies:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while userland_proxies(deployed.ports["gateway"]) and time.monotonic() < deadline:
        time.sleep(0.2)

    result = deployed.status("--json")
    assert result.returncode == 1, result.stdout + result.stderr
    answered = rows(result)
    gateway = answered["gateway"]
    assert not gateway["ok"] and gateway["answer"].startswith("no answer") and gateway["latency_ms"] is None, gateway
    assert gateway["containers"] == "3/3 healthy", gateway
    gateway_container = deployed.engine.client.containers.get(f"{deployed.engine.stack}-gateway")
    assert gateway_container.attrs["State"]["Health"]["Status"] == "healthy"
    assert answered["model registry"]["ok"] and answered["image registry"]["ok"]

    table = deployed.status()
    assert table.returncode == 1 and "not ok: gateway" in table.stdout, table.stdout + table.stderr


def test_an_unknown_stage_is_one_line_and_exit_2():
    result = subprocess.run([*MLOPS, "status", "no-such-stage"], capture_output=True, text=True, timeout=60,
                            cwd=REPO_ROOT)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "no stage 'no-such-stage'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_on_a_swarm_the_manager_counts_every_task_running_on_any_node(monkeypatch):
    """`docker service ls` and `service inspect` answers as the engine gives them, for a stage whose replicas run
    on workers and one of which is still starting."""
    from mlops import settle, status

    answers = {"ls": "cluster-iris-classifier-blue 2/3\ncluster-gateway 1/1\ncluster-prometheus 1/1\n",
               "inspect": json.dumps([{"ID": f"id{index}", "Spec": {"Name": name, "Labels": {"mlops.component": component}}}
                                      for index, (name, component) in enumerate([
                                          ("cluster-iris-classifier-blue", "model-serving"),
                                          ("cluster-gateway", "serving-gateway"), ("cluster-prometheus", "monitoring")])])}
    asked = []

    def docker(environment, *args):
        asked.append((environment["DOCKER_HOST"], args[:2]))
        return answers[args[1]]

    monkeypatch.setattr(settle, "_docker", docker)  # status reads the services as `mlops settle` does
    spec = load_stages(["cluster"])[0]
    health, problem, refusals = status._tasks_health(spec)
    assert problem == "" and refusals == [] and {host for host, _ in asked} == {spec.docker.url}
    assert status._summary(health["model-serving"] + health["serving-gateway"], problem) == (
        "3/4 healthy (not running)", False)
    assert status._summary(health["monitoring"], problem) == ("1/1 healthy", True)


def test_a_replica_that_refused_its_model_is_reported_with_the_reason_it_logged(monkeypatch):
    from mlops import status

    def container(name: str, status: str, health: str) -> dict:
        return {"Id": f"id-{name}", "Name": f"/{name}", "Config": {"Labels": {"mlops.component": "model-serving"}},
                "State": {"Status": status, "Health": {"Status": health}}}
    inspected = [container("dev-iris-classifier-blue-0", "running", "healthy"),
                 container("dev-iris-classifier-blue-1", "restarting", "unhealthy"),
                 container("dev-iris-classifier-green-0", "running", "starting")]
    logs = {"id-dev-iris-classifier-blue-1": "2026-12-06 19:00:00,000 ERROR serving: refusing model iris-classifier v3: "
                                             "its signature verifies with none of the 1 keys in MODEL_SIGNING_KEYS\n",
            "id-dev-iris-classifier-green-0": "2026-12-06 19:00:00,000 WARNING serving.registry: model registry not "
                                              "reachable yet\n"}
    read_logs = []

    def docker(environment, *args):
        if args[0] == "logs":
            read_logs.append(args[-1])
            return logs[args[-1]]
        return {"ls": "id-a id-b id-c", "inspect": json.dumps(inspected)}[args[1]]

    monkeypatch.setattr(status, "_docker", docker)
    health, problem, refusals = status._containers_health(load_stages(["dev"])[0])
    assert problem == "" and health["model-serving"] == ["healthy", "restarting", "starting"]
    assert refusals == ["dev-iris-classifier-blue-1: refusing model iris-classifier v3: its signature verifies with "
                        "none of the 1 keys in MODEL_SIGNING_KEYS"]
    assert sorted(read_logs) == ["id-dev-iris-classifier-blue-1", "id-dev-iris-classifier-green-0"], \
        "only the replicas that are not healthy are read"


def test_the_table_has_one_row_per_served_model_and_slot(released_environments, monkeypatch):
    """What `mlops status` prints under the endpoints, from the rows `mlops.rollout.status_rows` gives."""
    from typer.testing import CliRunner

    from mlops import rollout
    from mlops import status as probing
    from mlops.cli import app

    slots = [rollout.SlotRow("diabetes-regressor", "blue", "2", 2, 100, None, None, None, "-"),
             rollout.SlotRow("iris-classifier", "blue", "4", 3, 90, 0.001, 12.0, 0.04, "-"),
             rollout.SlotRow("iris-classifier", "green", "5", 3, 10, 0.25, None, None, "baking, step 1/2")]
    asked = []

    def stage_status(spec):
        asked.append(spec.stage)
        return probing.StageStatus(spec.stage, spec.docker.url, [], "", slots, "", [])
    monkeypatch.setattr(probing, "stage_status", stage_status)
    result = CliRunner().invoke(app, ["status", "prod", "--environments", str(released_environments)],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0 and asked == ["prod"], result.output
    served = result.output.split("served models", 1)[1]
    table = [[cell.strip() for cell in line.strip().strip("│┃").replace("┃", "│").split("│")]
             for line in served.splitlines() if line.startswith(("│", "┃"))]
    assert table[0] == ["model", "slot", "version", "replicas", "weight", "errors (1m)", "p99 ms (1m)",
                        "max drift (PSI)", "rollout"]
    assert table[1:] == [slot.cells() for slot in slots]
    assert table[3] == ["iris-classifier", "green", "5", "3", "10%", "25.00%", "-", "-", "baking, step 1/2"]
    as_json = json.loads(CliRunner().invoke(app, ["status", "prod", "--json", "--environments",
                                                  str(released_environments)]).output)
    assert [(slot["model"], slot["slot"], slot["replicas"]) for slot in as_json["slots"]] == [
        ("diabetes-regressor", "blue", 2), ("iris-classifier", "blue", 3), ("iris-classifier", "green", 3)]


def test_mlflow_published_off_loopback_is_probed_over_tls_reading_no_secret(monkeypatch, tmp_path):
    """The row of a service that speaks TLS asks it over TLS, and `mlops status` still reads no secret (the
    stage's CA derives from one), so the probe does not verify the certificate: it sends nothing to steal."""
    import http.server
    import ssl
    import threading

    from mlops import status
    from mlops.reach import StageReach
    from mlops_spec.service_tls import server_tls

    tls = server_tls("a secret mlops status never reads", "dev", "model-registry", ())
    (tmp_path / "certificate.pem").write_text(tls.certificate)
    (tmp_path / "key.pem").write_text(tls.key)

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *_args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "certificate.pem", tmp_path / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(status, "_containers_health", lambda spec: ({"model-registry": ["healthy"]}, "", []))
    monkeypatch.delenv("MLOPS_MLFLOW_PASSWORD_DEV", raising=False)
    dev = load_stages(["dev"])[0]

    def row_published_on(bind_address: str) -> status.Row:
        port = dev.model_registry.port.model_validate(
            {"host_port": server.server_address[1], "bind_address": bind_address, "public": True})
        spec = dev.model_copy(update={"model_registry": dev.model_registry.model_copy(update={"port": port})})
        with StageReach(spec) as reach:
            row = status.model_registry(status.Probe(spec, reach))
        assert row is not None, "every stage has a model registry row"
        return row
    try:
        row = row_published_on("0.0.0.0")
        assert (row.ok, row.answer) == (True, "GET /health: 200")
        assert not row_published_on("127.0.0.1").ok, "on loopback the probe speaks plain HTTP, which a TLS port refuses"
    finally:
        server.shutdown()
