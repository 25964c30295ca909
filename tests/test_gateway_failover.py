"""The serving path on a real engine: the MLflow image as the model's source, serving (oip) replicas in
blue and green, the gateway in front; and the image registry's authentication.

Every container runs with the hardening of components/workload.py. Everything created is named
`t-gw-<run>-...` and removed at the end. Load goes to loopback only, bounded in time and count.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import pickle
import resource
import secrets
import socket
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, Sequence

import numpy as np
import pytest
import tritonclient.http as triton
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from open_inference.openapi.client import OpenInferenceClient
from sklearn.datasets import load_iris
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.tree import DecisionTreeClassifier
from tritonclient.utils import InferenceServerException

from components.image_registry import htpasswd_entry
from components.model_registry import mlflow_password_hashes
from components.workload import APP_USER, IPC_MODE, PROCESS_LIMIT, TMP_MB, TMP_OPTIONS
from mlops.modelstore import BasicAuth
from mlops_spec.contract import READER, TRAINER, GatewayRoute, derived_password, gateway_env
from mlops_spec.models import TrafficSplit
from mlops_spec.project import REPO_ROOT
from tests.model_signing import SESSION_SIGNER, TRUSTED_KEYS_PEM

pytestmark = pytest.mark.docker

# The hardening components/workload.py declares, as `docker run` options.
HARDENED = ["--user", APP_USER, "--read-only", "--tmpfs", f"/tmp:{TMP_OPTIONS},size={TMP_MB}m",
            "--security-opt", "no-new-privileges:true", "--cap-drop", "ALL",
            "--ipc", IPC_MODE, "--ulimit", f"nproc={PROCESS_LIMIT}:{PROCESS_LIMIT}"]
READY_PROBE = ("import sys,urllib.request\n"
               "try: urllib.request.urlopen(sys.argv[1], timeout=2)\n"
               "except Exception: sys.exit(1)")
INFER_PATH = "/v2/models/iris-classifier/infer"
INFER_BODY = json.dumps({"inputs": [{"name": "input-0", "datatype": "FP32", "shape": [1, 4],
                                     "data": [[6.7, 3.0, 5.2, 2.3]]}]}).encode()


def docker(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("text", True)
    return subprocess.run(["docker", *args], capture_output=True, check=check, **kwargs)


@dataclass
class Engine:
    """What one test run created on the engine, removed by `remove_all`."""

    prefix: str = field(default_factory=lambda: f"t-gw-{secrets.token_hex(3)}")
    containers: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    networks: list[str] = field(default_factory=list)

    def build(self, context: str, target: str | None = None) -> str:
        """`context` built (once per run) as `<prefix>-<folder>:<target>`."""
        tag = f"{self.prefix}-{Path(context).name}:{target or 'test'}"
        if tag not in self.images:
            docker("build", "-q", "-t", tag, *(["--target", target] if target else []), str(REPO_ROOT / context))
            self.images.append(tag)
        return tag

    def network(self) -> str:
        name = f"{self.prefix}-net"
        self.networks.append(name)
        docker("network", "create", name)
        return name

    def volume(self, role: str) -> str:
        name = f"{self.prefix}-{role}"
        self.volumes.append(name)
        docker("volume", "create", name)
        return name

    def run(self, role: str, image: str, *options: str, ready_path: str | None = None, port: int | None = None,
            health_retries: int = 120) -> str:
        """Start `image` hardened as `<prefix>-<role>`; with `port`, published on a free loopback port. Its health
        check probes `ready_path` every second and fails after `health_retries` failures in a row."""
        name = f"{self.prefix}-{role}"
        self.containers.append(name)
        health = ["--health-cmd", f"python3 -c '{READY_PROBE}' http://127.0.0.1:{port}{ready_path}",
                  "--health-interval", "1s", "--health-retries", str(health_retries)] if ready_path else []
        publish = ["-p", f"127.0.0.1::{port}"] if port else []
        docker("run", "-d", "--name", name, *HARDENED, *health, *publish, *options, image)
        return name

    @staticmethod
    def health(container: str) -> str:
        return docker("inspect", "-f", "{{.State.Health.Status}}", container).stdout.strip()

    def host_port(self, container: str, port: int) -> int:
        return int(docker("port", container, f"{port}/tcp").stdout.split(":")[-1])

    def wait_healthy(self, *containers: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        for container in containers:
            while (status := self.health(container)) != "healthy":
                if time.monotonic() > deadline:
                    logs = docker("logs", "--tail", "20", container, check=False)
                    pytest.fail(f"{container} is {status} after {timeout_s:.0f}s:\n{logs.stdout}{logs.stderr}")
                time.sleep(1)

    def remove_all(self) -> None:
        for command, names in ((["rm", "-f", "-v"], self.containers), (["network", "rm"], self.networks),
                               (["volume", "rm", "-f"], self.volumes), (["rmi", "-f"], self.images)):
            if names:
                docker(*command, *names, check=False)


@pytest.fixture(scope="module")
def engine(docker_engine):
    created = Engine()
    yield created
    created.remove_all()


class MlflowRest:
    """Registers model versions by the training contract over MLflow's REST API (the tests' venv has no
    MLflow client), as MLflow user `trainer`: `model/model.pkl` and `model/manifest.json` on the run, the
    version tagged with both files' hashes and signed with the session's key, as `mlops train` leaves it."""

    def __init__(self, url: str, auth: BasicAuth) -> None:
        self.url = url
        self.auth = auth

    def call(self, method: str, path: str, body: bytes | None) -> dict:
        request = urllib.request.Request(self.url + path, data=body, method=method,
                                         headers={"Content-Type": "application/json", "Authorization": self.auth.header})
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = response.read()
        return json.loads(answer) if answer else {}

    def post(self, path: str, **fields) -> dict:
        return self.call("POST", f"/api/2.0/mlflow/{path}", json.dumps(fields).encode())

    def register(self, name: str, payload: bytes, manifest: dict | None = None,
                 skops_form: bytes | None = None) -> tuple[str, str]:
        """A new version of `name` holding `payload`, and with `manifest` its manifest (else one that names only the
        model's hash: no schema, no reference profile), and `skops_form` as its model.skops (of types skops trusts by
        default); returns (version, sha256)."""
        sha256 = hashlib.sha256(payload).hexdigest()
        skops_output = {} if skops_form is None else {
            "skops": {"sha256": hashlib.sha256(skops_form).hexdigest(), "trusted_types": []}}
        described = {**(manifest or {}), "outputs": {"model_sha256": sha256, **skops_output}}
        manifest_bytes = json.dumps(described).encode()
        run = self.post("runs/create", experiment_id="0")["run"]["info"]
        location = run["artifact_uri"].removeprefix("mlflow-artifacts:").strip("/")
        artifacts = {"model.pkl": payload, "manifest.json": manifest_bytes,
                     **({} if skops_form is None else {"model.skops": skops_form})}
        for artifact, content in artifacts.items():
            self.call("PUT", f"/api/2.0/mlflow-artifacts/artifacts/{location}/model/{artifact}", content)
        self.post("runs/update", run_id=run["run_id"], status="FINISHED")
        version = self.post("model-versions/create", name=name, source=f"runs:/{run['run_id']}/model",
                            run_id=run["run_id"])["model_version"]["version"]
        for key, value in SESSION_SIGNER.tags(name, payload, manifest_bytes).items():
            self.post("model-versions/set-tag", name=name, version=version, key=key, value=value)
        return version, sha256


@dataclass(frozen=True)
class ModelSource:
    """The stage's MLflow, as replicas (`tracking_uri`, inside the network, as user `reader`) and the tests
    (`mlflow`) reach it."""
    network: str
    tracking_uri: str
    mlflow: MlflowRest
    reader_password: str


def start_model_source(engine: Engine) -> ModelSource:
    """A network and the MLflow image on it, with the model name registered and no version yet."""
    for image in ("serving", "mlflow"):
        subprocess.run([str(REPO_ROOT / "scripts" / "fetch-wheels.sh"), f"images/{image}"], cwd=REPO_ROOT,
                       check=True, capture_output=True)
    network = engine.network()
    secret = secrets.token_hex(16)
    # The MLflow image accepts the Host header `*-model-registry:5000`, as the stack names it.
    registry = engine.run("model-registry", engine.build("images/mlflow"), "--network", network,
                          "-v", f"{engine.volume('mlflow-db')}:/data/db",
                          "-v", f"{engine.volume('artifacts')}:/data/artifacts",
                          "-e", f"MLOPS_MLFLOW_PASSWORD_HASHES={mlflow_password_hashes(secret, engine.prefix)}",
                          ready_path="/health", port=5000)
    engine.wait_healthy(registry)
    mlflow = MlflowRest(f"http://127.0.0.1:{engine.host_port(registry, 5000)}",
                        BasicAuth(TRAINER, derived_password(secret, TRAINER)))
    mlflow.post("registered-models/create", name="iris-classifier")
    return ModelSource(network=network, tracking_uri=f"http://{registry}:5000", mlflow=mlflow,
                       reader_password=derived_password(secret, READER))


def start_replica(engine: Engine, source: ModelSource, role: str, pin: tuple[str, str], runtime: str = "oip",
                  health_retries: int = 120, env: Mapping[str, str] = MappingProxyType({}),
                  model: str = "iris-classifier") -> str:
    """A serving replica of `runtime` with the stage's serving limits, pinned to (version, sha256) of `model`; `env`
    adds settings such as batching's."""
    version, sha256 = pin
    return engine.run(
        role, engine.build("images/serving", target=runtime), "--network", source.network, "--cpus", "1",
        "--memory", "512m", "--restart", "unless-stopped",
        "-e", f"MODEL_NAME={model}", "-e", f"MODEL_VERSION={version}", "-e", f"MODEL_SHA256={sha256}",
        "-e", f"MLFLOW_TRACKING_URI={source.tracking_uri}", "-e", f"SERVING_RUNTIME={runtime}",
        "-e", f"MLFLOW_TRACKING_USERNAME={READER}", "-e", f"MLFLOW_TRACKING_PASSWORD={source.reader_password}",
        "-e", f"MODEL_SIGNING_KEYS={TRUSTED_KEYS_PEM}",
        *(option for key, value in env.items() for option in ("-e", f"{key}={value}")),
        ready_path="/v2/health/ready", port=8080, health_retries=health_retries)


def start_gateway(engine: Engine, source: ModelSource, role: str, blue: Sequence[str], green: Sequence[str] = (),
                  weight_green: int = 0, other_models: Mapping[str, Sequence[str]] = MappingProxyType({})) -> str:
    """The gateway with the stage's gateway limits, published on loopback, in front of iris-classifier's `blue` and
    `green` replicas and each of `other_models` (name -> its blue replicas), with the environment the stack renders."""
    routes = [GatewayRoute("iris-classifier", [f"{name}:8080" for name in blue], [f"{name}:8080" for name in green],
                           TrafficSplit(blue=100 - weight_green, green=weight_green)),
              *(GatewayRoute(model, [f"{name}:8080" for name in replicas], [], TrafficSplit())
                for model, replicas in other_models.items())]
    return engine.run(
        role, engine.build("images/gateway"), "--network", source.network, "--cpus", "0.5", "--memory", "128m",
        *(option for key, value in gateway_env(routes, None, None).items() for option in ("-e", f"{key}={value}")),
        ready_path="/gateway/health", port=8080)


def gateway_url(engine: Engine, gateway: str) -> str:
    return f"http://127.0.0.1:{engine.host_port(gateway, 8080)}"


def from_the_network(container: str, url: str, method: str = "GET") -> str:
    """The body `url` answers (or `HTTP <status>`), fetched from inside `container` on the stage network."""
    fetch = ("import sys,urllib.request,urllib.error\n"
             "try: sys.stdout.write(urllib.request.urlopen(urllib.request.Request(sys.argv[1], method=sys.argv[2],"
             " data=b'{}' if sys.argv[2] == 'POST' else None), timeout=10).read().decode())\n"
             "except urllib.error.HTTPError as error: sys.stdout.write(f'HTTP {error.code}')")
    return docker("exec", container, "python3", "-c", fetch, url, method).stdout


def infers_answered(gateway: str, replica: str) -> float:
    """How many infers an `oip` replica answered 200, from its metrics (port 8082, inside the network)."""
    metrics = from_the_network(gateway, f"http://{replica}:8082/metrics")
    return next((float(line.split()[-1]) for line in metrics.splitlines()
                 if line.startswith('oip_infer_requests_total{status="200"}')), 0.0)


@dataclass(frozen=True)
class ServingStack:
    gateway: str
    gateway_url: str
    replicas: dict[str, list[str]]
    versions: dict[str, str]
    """Model version served by each pool."""
    source: ModelSource


@pytest.fixture(scope="module")
def serving_stack(engine) -> ServingStack:
    source = start_model_source(engine)
    features, labels = load_iris(return_X_y=True)
    # Two versions so blue and green are told apart by the `model_version` of their answers.
    pins = {pool: source.mlflow.register("iris-classifier", pickle.dumps(DecisionTreeClassifier(random_state=seed).fit(features, labels)))
            for pool, seed in (("blue", 0), ("green", 1))}
    replicas = {pool: [start_replica(engine, source, f"serving-{pool}-{index}", pins[pool]) for index in range(count)]
                for pool, count in (("blue", 2), ("green", 1))}
    gateway = start_gateway(engine, source, "gateway", replicas["blue"], replicas["green"], weight_green=20)
    engine.wait_healthy(*replicas["blue"], *replicas["green"], gateway)
    return ServingStack(gateway=gateway, gateway_url=gateway_url(engine, gateway), replicas=replicas,
                        versions={pool: version for pool, (version, _) in pins.items()}, source=source)


@dataclass
class LoadOutcome:
    succeeded: int = 0
    failed: Counter = field(default_factory=Counter)
    """Failure kind (HTTP status or exception name) -> count."""
    versions: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return self.succeeded + sum(self.failed.values())


async def post_load(url: str, body: bytes, *, connections: int, duration_s: float, max_requests: int,
                    outcome: LoadOutcome) -> None:
    """Closed-loop keep-alive POSTs from `connections` clients until `duration_s` or `max_requests`.
    A dropped connection is a failed request (no client-side retry) and is reopened for the next one."""
    host, port = url.removeprefix("http://").split(":")
    request = (f"POST {INFER_PATH} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    deadline = time.monotonic() + duration_s

    async def client() -> None:
        stream = None
        while time.monotonic() < deadline and outcome.total < max_requests:
            try:
                if stream is None:
                    stream = await asyncio.open_connection(host, int(port))
                reader, writer = stream
                writer.write(request)
                status, headers, answer = await asyncio.wait_for(read_response(reader), timeout=15)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as error:
                outcome.failed[type(error).__name__] += 1
                if stream is not None:
                    stream[1].close()
                stream = None
                continue
            if status == 200:
                outcome.succeeded += 1
                outcome.versions[json.loads(answer)["model_version"]] += 1
            else:
                outcome.failed[status] += 1
            if headers.get("connection") == "close":
                writer.close()
                stream = None
        if stream is not None:
            stream[1].close()

    await asyncio.gather(*(client() for _ in range(connections)))


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    headers = dict((key.strip().lower(), value.strip()) for key, value in (line.split(":", 1) for line in head[1:] if line))
    return int(head[0].split()[1]), headers, await reader.readexactly(int(headers.get("content-length", 0)))


def test_traffic_splits_by_the_declared_weights(serving_stack):
    outcome = LoadOutcome()
    asyncio.run(post_load(serving_stack.gateway_url, INFER_BODY, connections=4, duration_s=60, max_requests=1000,
                          outcome=outcome))
    assert outcome.failed == Counter() and outcome.succeeded >= 1000
    green_share = outcome.versions[serving_stack.versions["green"]] / outcome.succeeded
    print(f"\nsplit: green answered {green_share:.1%} of {outcome.succeeded} requests (declared 20%)")
    # 1000 draws at p=0.2: the standard deviation is 1.3 points, so 5 points is a ~4 sigma bound.
    assert abs(green_share - 0.20) <= 0.05, f"green got {green_share:.1%} of {outcome.succeeded} requests, declared 20%"
    assert set(outcome.versions) == set(serving_stack.versions.values())


SECOND_MODEL = "iris-petals"


@dataclass(frozen=True)
class TwoModels:
    gateway: str
    url: str
    replica: str
    """The second model's one replica."""
    versions: dict[str, str]
    """Model -> the version its blue replicas serve."""


@pytest.fixture(scope="module")
def two_models(engine, serving_stack) -> TwoModels:
    """A gateway in front of iris-classifier's blue replicas and of a second model with a replica of its own."""
    source = serving_stack.source
    source.mlflow.post("registered-models/create", name=SECOND_MODEL)
    features, labels = load_iris(return_X_y=True)
    version, sha256 = source.mlflow.register(SECOND_MODEL, pickle.dumps(
        DecisionTreeClassifier(max_depth=1, random_state=0).fit(features[:, 2:], labels)))
    replica = start_replica(engine, source, "serving-petals-0", (version, sha256), model=SECOND_MODEL)
    gateway = start_gateway(engine, source, "gateway-two-models", serving_stack.replicas["blue"],
                            other_models={SECOND_MODEL: [replica]})
    engine.wait_healthy(replica, gateway)
    return TwoModels(gateway, gateway_url(engine, gateway), replica,
                     {"iris-classifier": serving_stack.versions["blue"], SECOND_MODEL: version})


def call(url: str, body: bytes | None = None) -> tuple[int, Mapping[str, str], dict]:
    """Status, headers and JSON body (empty: {}) of a GET, or of a POST of `body`."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, headers, answer = response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        status, headers, answer = error.code, error.headers, error.read()
    return status, headers, json.loads(answer) if answer else {}


def eventually_answers(url: str, status: int, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while (answer := call(url))[0] != status:
        assert time.monotonic() < deadline, f"{url} answers {answer[0]} {answer[2]}, not {status}, after {timeout_s:.0f} s"
        time.sleep(0.5)
    return answer[2]


def petals_body(rows: list[list[float]]) -> bytes:
    return json.dumps({"inputs": [{"name": "input-0", "datatype": "FP64", "shape": [len(rows), 2],
                                   "data": rows}]}).encode()


def test_each_model_goes_to_its_own_replicas_and_an_unknown_model_is_a_404_at_the_gateway(two_models):
    assert eventually_answers(f"{two_models.url}/v2/health/ready", 200, timeout_s=30) == {"ready": True}
    for model, body in (("iris-classifier", INFER_BODY), (SECOND_MODEL, petals_body([[5.2, 2.3]]))):
        status, headers, answer = call(f"{two_models.url}/v2/models/{model}/infer", body)
        assert (status, headers["X-Gateway-Pool"]) == (200, "blue"), answer
        assert (answer["model_name"], answer["model_version"]) == (model, two_models.versions[model])
        assert call(f"{two_models.url}/v2/models/{model}")[2]["name"] == model
    served = f"models: iris-classifier, {SECOND_MODEL}"
    for path, body in (("/v2/models/iris-regressor", None), ("/v2/models/iris-regressor/infer", INFER_BODY),
                       ("/v2/models/iris-regressor/versions/1/ready", None)):
        status, headers, answer = call(two_models.url + path, body)
        assert (status, answer) == (404, {"error": f"model iris-regressor is not served here; {served}"}), path
        assert "X-Gateway-Pool" not in headers, "the gateway answered it, no replica"
    assert call(f"{two_models.url}/v2/health/live")[:3:2] == (200, {"live": True})
    assert call(f"{two_models.url}/v2")[2]["extensions"] == ["binary_tensor_data"]
    metrics = from_the_network(two_models.gateway, "http://127.0.0.1:9102/metrics")
    for model in ("iris-classifier", SECOND_MODEL):
        assert f'mlops_gateway_requests_total{{model="{model}",slot="blue",code="200"}} ' in metrics, metrics
    assert "iris-regressor" not in metrics, "requests for an unknown model make no series"


KSERVE_ROWS = {"iris-classifier": [6.7, 3.0, 5.2, 2.3], SECOND_MODEL: [5.2, 2.3]}


async def kserve_session(url: str) -> dict:
    """Through KServe's REST client: the stage's health, then each model's readiness and its answer for one row
    (binary input, the client's default); an unknown model's readiness."""
    client = InferenceRESTClient(RESTConfig(protocol="v2"))
    try:
        seen: dict = {"live": await client.is_server_live(url), "ready": await client.is_server_ready(url)}
        for model, row in KSERVE_ROWS.items():
            tensor = InferInput("input-0", [1, len(row)], "FP64")
            tensor.set_data_from_numpy(np.array([row]))
            answer = await client.infer(url, InferRequest(model, [tensor]), model_name=model)
            seen[model] = answer.outputs[0].as_numpy().ravel().tolist() if await client.is_model_ready(url, model) \
                else None
        seen["iris-regressor"] = await client.is_model_ready(url, "iris-regressor")
        return seen
    finally:
        await client.close()


def test_the_client_libraries_call_health_metadata_and_infer_through_the_gateway_with_their_defaults(two_models):
    client = triton.InferenceServerClient(two_models.url.removeprefix("http://"))
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
        for model, rows in (("iris-classifier", np.array([[6.7, 3.0, 5.2, 2.3]])), (SECOND_MODEL, np.array([[1.4, 0.2]]))):
            assert client.is_model_ready(model)
            assert client.get_model_metadata(model)["name"] == model
            tensor = triton.InferInput("input-0", list(rows.shape), "FP64")
            tensor.set_data_from_numpy(rows)  # binary, the client's default
            answer = client.infer(model, [tensor])
            assert answer.get_response()["model_name"] == model and answer.as_numpy("predict").shape == (1,)
        with pytest.raises(InferenceServerException, match="model iris-regressor is not served here"):
            client.get_model_metadata("iris-regressor")
    finally:
        client.close()
    # KServe's client reads `live` and `ready` from the server's health bodies, and the status alone for a model's
    # readiness; its protocol must be named, its default being KServe's own V1.
    answered_as_json = {model: call(f"{two_models.url}/v2/models/{model}/infer", json.dumps({"inputs": [
        {"name": "input-0", "datatype": "FP64", "shape": [1, len(row)], "data": row}]}).encode())[2]["outputs"][0]["data"]
        for model, row in KSERVE_ROWS.items()}
    assert asyncio.run(kserve_session(two_models.url)) == {
        "live": True, "ready": True, **answered_as_json, "iris-regressor": False}
    oip = OpenInferenceClient(base_url=two_models.url)
    oip.check_server_liveness()
    oip.check_server_readiness()
    oip.check_model_readiness(SECOND_MODEL)
    assert oip.read_model_metadata(SECOND_MODEL).name == SECOND_MODEL


def test_the_stage_is_unready_while_a_model_has_no_ready_replica_and_ready_again_once_it_has(two_models):
    docker("stop", two_models.replica)
    try:
        answer = eventually_answers(f"{two_models.url}/v2/health/ready", 503, timeout_s=15)
        assert answer["ready"] is False
        assert call(f"{two_models.url}/v2/models/iris-classifier/infer", INFER_BODY)[0] == 200, "the other model serves on"
    finally:
        docker("start", two_models.replica)
    assert eventually_answers(f"{two_models.url}/v2/health/ready", 200, timeout_s=120) == {"ready": True}


IDLE_CONNECTIONS = 5000
# An oip replica runs 6 tasks at rest and the gateway 3 (components/containers.py); a thread per connection
# would pass this after the first batch.
TASKS_AT_MOST = 32


def network_address(container: str) -> str:
    return docker("inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", container).stdout.strip()


def tasks(container: str) -> int:
    """The container's processes and threads, as its cgroup's pids controller counts them."""
    return int(docker("stats", "--no-stream", "--format", "{{.PIDs}}", container).stdout)


def test_idle_connections_to_the_metrics_ports_take_no_thread_and_stop_no_scrape_or_health_check(serving_stack):
    """What exhausted RLIMIT_NPROC for every uid-10001 container on the host: 5,000 connections to each metrics
    port that never send a request. Each costs no thread, the longest-waiting ones are closed, and scrapes,
    health checks and infers keep being answered meanwhile."""
    metrics_ports = {serving_stack.replicas["blue"][0]: 8082, serving_stack.gateway: 9102}
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, len(metrics_ports) * IDLE_CONNECTIONS + 1024), hard))
    held: dict[str, list[socket.socket]] = {container: [] for container in metrics_ports}
    try:
        for _ in range(0, IDLE_CONNECTIONS, 500):
            for container, port in metrics_ports.items():
                address = network_address(container)
                held[container] += [socket.create_connection((address, port), timeout=10) for _ in range(500)]
                assert tasks(container) <= TASKS_AT_MOST, f"{container} starts a task per idle connection"
        for container, port in metrics_ports.items():
            scrape = urllib.request.urlopen(f"http://{network_address(container)}:{port}/metrics", timeout=5)
            assert scrape.status == 200 and b"# TYPE " in scrape.read()
            oldest = held[container][0]
            oldest.settimeout(15)
            with contextlib.suppress(ConnectionResetError):
                assert oldest.recv(1) == b"", f"{container} keeps the oldest idle connection open"
        # Health checks run every second (Engine.run): a few more must pass while the connections are held.
        time.sleep(3)
        for container in metrics_ports:
            health = json.loads(docker("inspect", "-f", "{{json .State.Health}}", container).stdout)
            assert health["Status"] == "healthy" and health["FailingStreak"] == 0, health["Log"][-1]
        assert urllib.request.urlopen(f"{serving_stack.gateway_url}/v2/health/ready", timeout=5).status == 200
    finally:
        for connection in (connection for connections in held.values() for connection in connections):
            connection.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_killing_a_replica_under_load_loses_at_most_a_thousandth(serving_stack):
    outcome = LoadOutcome()
    victim = serving_stack.replicas["blue"][1]

    async def load_and_kill() -> None:
        load = asyncio.create_task(post_load(serving_stack.gateway_url, INFER_BODY, connections=16, duration_s=20,
                                             max_requests=400_000, outcome=outcome))
        await asyncio.sleep(10)
        await asyncio.to_thread(docker, "kill", victim)
        await load

    asyncio.run(load_and_kill())
    failed = sum(outcome.failed.values())
    print(f"\nfailover: {outcome.total} requests in 20 s, {failed} failed ({failed / outcome.total:.3%}) "
          f"{dict(outcome.failed)}; by model version {dict(outcome.versions)}")
    assert docker("inspect", "-f", "{{.State.Running}}", victim).stdout.strip() == "false"
    assert outcome.total >= 2000, "too little load to measure a 0.1% loss rate"
    assert failed <= outcome.total / 1000, f"{failed} of {outcome.total} requests failed: {dict(outcome.failed)}"


def test_a_replica_pinned_to_other_bytes_exits_with_one_clear_line(engine, serving_stack):
    version = serving_stack.versions["blue"]
    source = serving_stack.source
    replica = engine.run("serving-mispinned", engine.build("images/serving", target="oip"), "--network", source.network,
                         "-e", "MODEL_NAME=iris-classifier", "-e", f"MODEL_VERSION={version}",
                         "-e", f"MODEL_SHA256={'0' * 64}", "-e", f"MLFLOW_TRACKING_URI={source.tracking_uri}",
                         "-e", f"MLFLOW_TRACKING_USERNAME={READER}",
                         "-e", f"MLFLOW_TRACKING_PASSWORD={source.reader_password}",
                         "-e", f"MODEL_SIGNING_KEYS={TRUSTED_KEYS_PEM}")
    exit_code = docker("wait", replica, timeout=120).stdout.strip()
    logs = docker("logs", replica)
    assert exit_code != "0"
    assert f"refusing model iris-classifier v{version}: sha256 " in logs.stdout
    assert f"does not match pinned {'0' * 64}" in logs.stdout


POISON = "/tmp/poisoned"


class PassThrough:
    """A pipeline step that passes features through here, and unpickles in a replica as `in_replica`, the
    source of a function: unpickling runs code, which lets a test poison a running replica's model."""

    def __init__(self, in_replica: str) -> None:
        self.in_replica = in_replica

    def __call__(self, features):
        return features

    def __reduce__(self):
        return eval, (self.in_replica,)


def model_that_in_replica_is(in_replica: str) -> bytes:
    features, labels = load_iris(return_X_y=True)
    return pickle.dumps(make_pipeline(FunctionTransformer(PassThrough(in_replica)),
                                      DecisionTreeClassifier(random_state=0)).fit(features, labels))


def replica_log_shows(container: str, line: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        logs = docker("logs", container, check=False)
        if line in logs.stdout + logs.stderr:
            return True
        time.sleep(1)
    return False


def test_a_replica_whose_model_cannot_predict_never_turns_ready(engine, serving_stack):
    pin = serving_stack.source.mlflow.register("iris-classifier", model_that_in_replica_is("lambda features: 1 / 0"))
    replica = start_replica(engine, serving_stack.source, "serving-unready", pin)
    assert replica_log_shows(replica, "not ready: the test prediction failed: ZeroDivisionError", timeout_s=120)
    assert engine.health(replica) != "healthy"


def test_a_poisoned_replica_fails_no_request_and_leaves_rotation_until_it_predicts_again(engine, serving_stack):
    """Every infer on one of two replicas raises (500): the gateway retries each on the other, and after 3 such
    failures in a row the poisoned replica's readiness, and so its health check, fails; once its model
    predicts again it is healthy again."""
    source = serving_stack.source
    pin = source.mlflow.register("iris-classifier", model_that_in_replica_is(
        f"lambda features: 1 / 0 if __import__('os').path.exists({POISON!r}) else features"))
    healthy, poisoned = (start_replica(engine, source, f"serving-poison-{index}", pin, health_retries=3)
                         for index in range(2))
    gateway = start_gateway(engine, source, "gateway-poison", [healthy, poisoned])
    engine.wait_healthy(healthy, poisoned, gateway)
    docker("exec", poisoned, "touch", POISON)
    outcome = LoadOutcome()
    unhealthy_after_s: list[float] = []

    async def load_and_watch() -> None:
        started = time.monotonic()
        load = asyncio.create_task(post_load(gateway_url(engine, gateway), INFER_BODY, connections=4, duration_s=40,
                                             max_requests=200_000, outcome=outcome))
        while not load.done() and not unhealthy_after_s:
            if await asyncio.to_thread(engine.health, poisoned) == "unhealthy":
                unhealthy_after_s.append(time.monotonic() - started)
            await asyncio.sleep(0.5)
        # A few more seconds of load with the replica out of rotation, then the requests in flight are dropped
        # uncounted.
        await asyncio.sleep(3)
        load.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await load

    asyncio.run(load_and_watch())
    print(f"\npoisoned replica: {outcome.total} requests through the gateway, failed {dict(outcome.failed)}; "
          f"unhealthy after {unhealthy_after_s[0] if unhealthy_after_s else 'never'} s")
    assert outcome.failed == Counter() and outcome.succeeded >= 1000
    assert unhealthy_after_s, "the poisoned replica stayed healthy"
    docker("exec", poisoned, "rm", POISON)
    engine.wait_healthy(poisoned, timeout_s=30)


def test_a_request_that_makes_the_model_raise_takes_no_replica_out_of_rotation(engine, serving_stack):
    """A model that raises on one input value: that request gets 422 at once (every replica would fail it the
    same way, so it is not retried), and both replicas keep sharing everyone else's requests. Were it a 500,
    the gateway would try it on both and keep the first out of rotation for 5 s."""
    source = serving_stack.source
    pin = source.mlflow.register("iris-classifier", model_that_in_replica_is(
        "lambda features: 1 / 0 if (features[:, 0] == 42).any() else features"))
    replicas = [start_replica(engine, source, f"serving-input-{index}", pin) for index in range(2)]
    gateway = start_gateway(engine, source, "gateway-input", replicas)
    engine.wait_healthy(*replicas, gateway)
    poison = json.dumps({"inputs": [{"name": "input-0", "datatype": "FP64", "shape": [1, 4],
                                     "data": [[42, 3, 5, 2]]}]}).encode()
    outcome = LoadOutcome()

    async def poison_then_load() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(*gateway_url(engine, gateway).removeprefix("http://").split(":"))
        writer.write(f"POST {INFER_PATH} HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(poison)}\r\n\r\n".encode() + poison)
        status, _, answer = await read_response(reader)
        writer.close()
        await post_load(gateway_url(engine, gateway), INFER_BODY, connections=2, duration_s=5, max_requests=100_000,
                        outcome=outcome)
        return status, answer

    status, answer = asyncio.run(poison_then_load())
    answered = [infers_answered(gateway, replica) for replica in replicas]
    print(f"\npoison input: {status} {answer[:120]!r}; then {outcome.total} requests, failed {dict(outcome.failed)}, "
          f"answered by each replica {answered}")
    assert status == 422
    assert json.loads(answer)["error"].endswith("(it predicts others): ZeroDivisionError: division by zero")
    assert outcome.failed == Counter() and outcome.succeeded >= 100
    assert min(answered) >= outcome.succeeded / 4, "one replica was left out of rotation"


def tiny_image_tar() -> bytes:
    """A one-file root filesystem for `docker import`: something small to push and pull."""
    content = b"mlops registry test\n"
    archive = BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        member = tarfile.TarInfo("hello.txt")
        member.size = len(content)
        tar.addfile(member, BytesIO(content))
    return archive.getvalue()


def test_image_registry_pushes_and_pulls_by_digest_only_with_the_password(engine, tmp_path):
    password = secrets.token_hex(12)
    registry = engine.run("image-registry", engine.build("images/registry"),
                          "-v", f"{engine.volume('registry-data')}:/var/lib/registry",
                          "-e", f"REGISTRY_HTPASSWD_ENTRY={htpasswd_entry('mlops', password, engine.prefix)}",
                          port=5000)
    server = f"localhost:{engine.host_port(registry, 5000)}"
    deadline = time.monotonic() + 30
    while docker("exec", registry, "python3", "-c", READY_PROBE, "http://127.0.0.1:5000/", check=False).returncode:
        assert time.monotonic() < deadline, "the registry did not answer GET / within 30 s"
        time.sleep(0.5)
    # A private client config: the test's logins never touch the user's own credentials.
    env = {**os.environ, "DOCKER_CONFIG": str(tmp_path)}
    login = lambda secret: docker("login", "-u", "mlops", "--password-stdin", server, input=secret,  # noqa: E731
                                  check=False, env=env)

    assert login("not-" + password).returncode != 0
    assert login(password).returncode == 0
    local = f"{engine.prefix}-tiny:1"
    pushed = f"{server}/{engine.prefix}/tiny:1"
    engine.images.extend([local, pushed])
    docker("import", "-", local, input=tiny_image_tar(), text=False)
    docker("tag", local, pushed)
    docker("push", pushed, env=env)
    by_digest = docker("inspect", "-f", "{{index .RepoDigests 0}}", pushed).stdout.strip()
    engine.images.append(by_digest)
    docker("rmi", pushed, local)
    assert docker("pull", by_digest, env=env, check=False).returncode == 0
    docker("rmi", by_digest)
    docker("logout", server, env=env)
    refused = docker("pull", by_digest, env=env, check=False)
    assert refused.returncode != 0 and "no basic auth credentials" in refused.stderr
