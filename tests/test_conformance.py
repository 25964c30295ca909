"""Open Inference Protocol conformance of both serving runtimes, with three independent real clients.

NVIDIA's `tritonclient[http]` (the binary tensor data extension by default, JSON on request), KServe's
`InferenceRESTClient` (binary inputs by default) and the `open-inference-openapi` client, generated from the
protocol's own OpenAPI spec, talk to an `oip` replica
and an `mlserver` replica, each through its own gateway, on a real engine; replicas of models that raise
show both runtimes' readiness and failure answers. Every test runs against both runtimes.
"""
from __future__ import annotations

import asyncio
import http.client
import json
import pickle
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest
import skops.io
import tritonclient.http as triton
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from open_inference.openapi.client import OpenInferenceClient
from open_inference.openapi.core.api_error import ApiError
from open_inference.openapi.errors.bad_request_error import BadRequestError
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tritonclient.utils import InferenceServerException

from mlops_spec.project import REPO_ROOT
from tests.test_gateway_failover import (
    Engine,
    docker,
    eventually_answers,
    from_the_network,
    gateway_url,
    model_that_in_replica_is,
    start_gateway,
    start_model_source,
    start_replica,
)

sys.path.insert(0, str(REPO_ROOT / "images" / "serving"))
from serving.readiness import FAILURES_BEFORE_UNREADY  # noqa: E402

pytestmark = pytest.mark.docker

MODEL = "iris-classifier"
RUNTIMES = ("oip", "mlserver")
BATCHING = {"MAX_BATCH_SIZE": "64", "MAX_BATCH_TIME_MS": "20"}


@pytest.fixture(scope="module")
def iris():
    features, labels = load_iris(return_X_y=True)
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(features, labels), features


@dataclass(frozen=True)
class Deployed:
    url: str
    """The gateway's, in front of `replica`."""
    replica: str
    gateway: str
    version: str
    raising_on_42: str
    """A replica whose model raises for rows whose first feature is 42."""
    never_predicting: str
    """A replica whose model raises on every prediction."""
    batched_url: str
    """A replica batching concurrent requests, published on loopback; its model takes 50 ms a call (so requests
    pile up while it predicts) and raises for rows whose first feature is 42."""
    batched: str


@pytest.fixture(scope="module")
def deployed(docker_engine, iris):
    """{runtime: Deployed}: for each runtime, a replica of the model behind its own gateway, and two replicas of
    models that raise."""
    engine = Engine()
    try:
        source = start_model_source(engine)
        pins = {"iris": source.mlflow.register(MODEL, pickle.dumps(iris[0]), skops_form=skops.io.dumps(iris[0]))}
        pins |= {model: source.mlflow.register(MODEL, payload) for model, payload in (
            ("raising on 42", model_that_in_replica_is("lambda features: 1 / 0 if (features[:, 0] == 42).any() else features")),
            ("never predicting", model_that_in_replica_is("lambda features: 1 / 0")),
            ("batched", model_that_in_replica_is("lambda features: __import__('time').sleep(0.05) or "
                                                 "(1 / 0 if (features[:, 0] == 42).any() else features)")))}
        replicas = {(runtime, model): start_replica(engine, source, f"serving-{runtime}-{model.replace(' ', '-')}", pin,
                                                    runtime, env=BATCHING if model == "batched" else {})
                    for runtime in RUNTIMES for model, pin in pins.items()}
        gateways = {runtime: start_gateway(engine, source, f"gateway-{runtime}", [replicas[runtime, "iris"]])
                    for runtime in RUNTIMES}
        engine.wait_healthy(*(replicas[runtime, model] for runtime in RUNTIMES
                              for model in ("iris", "raising on 42", "batched")),
                            *gateways.values(), timeout_s=240)
        # Healthy containers are not yet a ready path: a gateway that met its replica still starting routes around
        # it for fail_timeout (5 s), which a loaded machine can stretch past the health wait. Up means ready there.
        for gateway in gateways.values():
            eventually_answers(f"{gateway_url(engine, gateway)}/v2/health/ready", 200, timeout_s=60)
        yield {runtime: Deployed(url=gateway_url(engine, gateways[runtime]), replica=replicas[runtime, "iris"],
                                 gateway=gateways[runtime], version=pins["iris"][0],
                                 raising_on_42=replicas[runtime, "raising on 42"],
                                 never_predicting=replicas[runtime, "never predicting"],
                                 batched_url=gateway_url(engine, replicas[runtime, "batched"]),
                                 batched=replicas[runtime, "batched"])
               for runtime in RUNTIMES}
    finally:
        engine.remove_all()


@pytest.fixture(params=RUNTIMES)
def runtime(request, deployed):
    return request.param


@pytest.fixture
def url(deployed, runtime) -> str:
    return deployed[runtime].url


@pytest.fixture
def version(deployed, runtime) -> str:
    return deployed[runtime].version


@pytest.fixture
def triton_client(url):
    client = triton.InferenceServerClient(url.removeprefix("http://"))
    yield client
    client.close()


@pytest.fixture
def oip_client(url):
    return OpenInferenceClient(base_url=url)


def triton_infer(client, rows: np.ndarray, *, binary_input: bool, binary_output: bool | None):
    """Infer as tritonclient does; `binary_output` None names no output, so the client asks for all of them binary."""
    tensor = triton.InferInput("input-0", list(rows.shape), "FP64")
    tensor.set_data_from_numpy(rows, binary_data=binary_input)
    outputs = None if binary_output is None else [triton.InferRequestedOutput("predict", binary_data=binary_output)]
    return client.infer(MODEL, [tensor], outputs=outputs, request_id="conformance-1")


def test_health_and_metadata_with_tritonclient(triton_client, version):
    assert triton_client.is_server_live() and triton_client.is_server_ready()
    assert triton_client.is_model_ready(MODEL) and triton_client.is_model_ready(MODEL, version)
    assert "binary_tensor_data" in triton_client.get_server_metadata()["extensions"]
    metadata = triton_client.get_model_metadata(MODEL, version)
    assert metadata["name"] == MODEL and metadata["versions"] == [version] and metadata["platform"] == "sklearn"
    assert metadata["inputs"] == [{"name": "input-0", "datatype": "FP64", "shape": [-1, 4]}]
    assert [output["name"] for output in metadata["outputs"]] == ["predict"]


def test_health_and_metadata_with_the_openapi_client(oip_client, version):
    oip_client.check_server_liveness()
    oip_client.check_server_readiness()
    oip_client.check_model_readiness(MODEL)
    oip_client.check_model_version_readiness(MODEL, version)
    assert "binary_tensor_data" in oip_client.read_server_metadata().extensions
    metadata = oip_client.read_model_version_metadata(MODEL, version)
    assert metadata.name == MODEL and metadata.versions == [version]
    assert [(tensor.name, tensor.datatype, tensor.shape) for tensor in metadata.inputs] == [("input-0", "FP64", [-1, 4])]


def test_health_and_inference_with_the_kserve_client(url, iris):
    """KServe's REST client with its defaults but the protocol (its default is KServe's own V1): server and model
    readiness, and an inference with its default binary input tensor, request id kept."""
    model, features = iris
    rows = features[::9]

    async def session():
        client = InferenceRESTClient(RESTConfig(protocol="v2"))
        try:
            tensor = InferInput("input-0", list(rows.shape), "FP64")
            tensor.set_data_from_numpy(rows)
            return (await client.is_server_live(url), await client.is_server_ready(url),
                    await client.is_model_ready(url, MODEL), await client.is_model_ready(url, "no-such-model"),
                    await client.infer(url, InferRequest(MODEL, [tensor], request_id="kserve-1"), model_name=MODEL))
        finally:
            await client.close()

    live, ready, model_ready, unknown_model_ready, response = asyncio.run(session())
    assert live and ready and model_ready and not unknown_model_ready
    assert (response.id, response.model_name) == ("kserve-1", MODEL)
    [output] = response.outputs
    assert output.name == "predict" and output.as_numpy().ravel().tolist() == model.predict(rows).tolist()


@pytest.mark.parametrize("binary_input, binary_output", [(True, None), (True, True), (True, False), (False, True),
                                                         (False, False)],
                         ids=["binary-default", "binary-in-out", "binary-in-json-out", "json-in-binary-out", "json"])
def test_infer_with_tritonclient(triton_client, iris, binary_input, binary_output):
    model, features = iris
    rows = features[::9]
    result = triton_infer(triton_client, rows, binary_input=binary_input, binary_output=binary_output)
    assert result.as_numpy("predict").ravel().tolist() == model.predict(rows).tolist()
    response = result.get_response()
    assert response["model_name"] == MODEL and response["id"] == "conformance-1"
    [output] = response["outputs"]
    assert ("binary_data_size" in output.get("parameters", {})) == (binary_output is not False)


def test_infer_with_the_openapi_client(oip_client, iris):
    model, features = iris
    rows = features[::9]
    answer = oip_client.model_infer(MODEL, request={"id": "conformance-2", "inputs": [
        {"name": "input-0", "shape": list(rows.shape), "datatype": "FP64", "data": rows.ravel().tolist()}]})
    assert answer.id == "conformance-2"
    [output] = answer.outputs
    assert output.name == "predict" and output.datatype == "INT64"
    assert [int(value) for value in output.data.__root__] == model.predict(rows).tolist()


def test_errors_are_v2_error_bodies_for_both_clients(triton_client, oip_client):
    with pytest.raises(InferenceServerException) as unknown:
        triton_client.get_model_metadata("no-such-model")
    assert unknown.value.status() == "404"
    # The generated client names only the errors the spec lists per endpoint; a 404 here is its ApiError.
    with pytest.raises(ApiError) as missing:
        oip_client.read_model_metadata("no-such-model")
    assert missing.value.status_code == 404 and "error" in missing.value.body
    with pytest.raises(BadRequestError) as empty:
        oip_client.model_infer(MODEL, request={"inputs": [{"name": "input-0", "shape": [0, 4], "datatype": "FP64",
                                                           "data": []}]})
    assert empty.value.body == {"error": "input 'input-0' has shape [0, 4]: a batch needs at least one row"}
    with pytest.raises(BadRequestError) as strings:
        oip_client.model_infer(MODEL, request={"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64",
                                                           "data": ["1.5", "2", "3", "4"]}]})
    assert strings.value.body == {"error": "input 'input-0' data must be FP64 numbers, flat or nested row-major"}


def test_only_the_v2_api_is_reachable_through_the_gateway(url, deployed, runtime):
    for path in ("/metrics", "/v2/repository/index", "/v2/models/iris-classifier/docs"):
        request = urllib.request.Request(url + path, method="POST" if path.endswith("index") else "GET")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 404, path
        assert json.loads(refused.value.read())["error"].startswith("no route"), path
    replica, gateway = deployed[runtime].replica, deployed[runtime].gateway
    assert "# TYPE" in from_the_network(gateway, f"http://{replica}:8082/metrics"), \
        "the replica serves Prometheus metrics on port 8082 inside the network"


def test_a_replica_serves_nothing_but_the_v2_api_inside_the_network_either(deployed, runtime):
    replica, gateway = deployed[runtime].replica, deployed[runtime].gateway
    for path in ("/v2/repository/index", "/v2/models/iris-classifier/generate", "/docs"):
        assert from_the_network(gateway, f"http://{replica}:8080{path}", method="POST").startswith("HTTP 404"), path
    grpc = docker("exec", gateway, "python3", "-c", "import socket,sys; socket.create_connection((sys.argv[1], 8081), 5)",
                  replica, check=False)
    assert "Connection refused" in grpc.stderr, "no gRPC server answers past the V2 layer"


def test_both_runtimes_build_a_model_with_a_skops_form_from_it_and_never_get_its_pickle(deployed, runtime):
    """The iris model has a skops form: the replica builds it with skops, and MLServer gets model.skops for
    serving.mlserver_skops's runtime, with no pickle beside it. The models without one (the other replicas) are
    unpickled, by MLServer's own runtime on `mlserver`."""
    replica = deployed[runtime].replica
    shown = docker("logs", replica)
    assert "from model.skops, loaded without pickle" in shown.stdout + shown.stderr
    if runtime == "mlserver":
        folder = "/tmp/mlserver/iris-classifier"
        settings = json.loads(docker("exec", replica, "cat", f"{folder}/model-settings.json").stdout)
        assert (settings["implementation"], settings["parameters"]["uri"]) == (
            "serving.mlserver_skops.SkopsModel", "./model.skops")
        assert docker("exec", replica, "ls", folder).stdout.split() == ["model-settings.json", "model.skops"]
        other = docker("exec", deployed[runtime].raising_on_42, "cat", f"{folder}/model-settings.json").stdout
        assert json.loads(other)["implementation"] == "mlserver_sklearn.SKLearnModel"


def test_inputs_that_make_the_model_raise_get_422_and_the_replica_stays_ready(deployed, runtime):
    replica, gateway = deployed[runtime].raising_on_42, deployed[runtime].gateway
    body = json.dumps({"inputs": [{"name": "input-0", "datatype": "FP64", "shape": [1, 4], "data": [42, 3, 5, 2]}]})
    for _ in range(FAILURES_BEFORE_UNREADY + 1):
        answer = docker("exec", gateway, "python3", "-c", POST_FROM_THE_NETWORK,
                        f"http://{replica}:8080/v2/models/{MODEL}/infer", body).stdout
        assert answer.startswith("422 ") and "cannot predict these inputs (it predicts others)" in answer, answer
    assert from_the_network(gateway, f"http://{replica}:8080/v2/health/ready") == ""


def test_a_model_that_cannot_predict_is_never_ready(deployed, runtime):
    replica, gateway = deployed[runtime].never_predicting, deployed[runtime].gateway
    deadline = time.monotonic() + 180
    while (ready := from_the_network(gateway, f"http://{replica}:8080/v2/health/ready")) != "HTTP 503":
        assert time.monotonic() < deadline, f"readiness answered {ready!r}, not 503"
        time.sleep(2)
    assert Engine.health(replica) != "healthy"


def concurrently_and_one_by_one(url: str, bodies: list[bytes]) -> tuple[list[tuple[int, dict]], list[tuple[int, dict]]]:
    """The answers to `bodies` sent all at once, then one after the other. Over kept-alive connections opened
    beforehand, as the gateway's upstream connections are: the requests then reach the replica while it
    predicts, not one accepted connection at a time."""
    host, port = url.removeprefix("http://").split(":")
    connections = [http.client.HTTPConnection(host, int(port), timeout=60) for _ in bodies]
    for connection in connections:
        connection.request("GET", "/v2/health/live")
        connection.getresponse().read()

    def post(connection: http.client.HTTPConnection, body: bytes) -> tuple[int, dict]:
        connection.request("POST", f"/v2/models/{MODEL}/infer", body=body, headers={"Content-Type": "application/json"})
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read())

    try:
        with ThreadPoolExecutor(len(bodies)) as clients:
            together = list(clients.map(post, connections, bodies))
        return together, [post(connections[0], body) for body in bodies]
    finally:
        for connection in connections:
            connection.close()


def infer_bodies(batches: list) -> list[bytes]:
    return [json.dumps({"id": f"req-{index}", "inputs": [{"name": "input-0", "datatype": "FP64",
                                                          "shape": [len(batch), 4], "data": batch}]}).encode()
            for index, batch in enumerate(batches)]


def mixed_row_counts(features: np.ndarray) -> list:
    return [features[index * 9:index * 9 + 1 + index % 3].tolist() for index in range(15)]


def test_concurrent_requests_get_the_answers_they_get_one_by_one(deployed, runtime, iris):
    together, one_by_one = concurrently_and_one_by_one(deployed[runtime].batched_url,
                                                       infer_bodies(mixed_row_counts(iris[1])))
    assert [status for status, _ in together] == [200] * 15, together
    assert together == one_by_one
    assert [answer["id"] for _, answer in together] == [f"req-{index}" for index in range(15)]


def test_oip_stacks_concurrent_requests_and_one_whose_rows_make_the_model_fail_fails_alone(deployed, iris):
    """On `oip` only: MLServer's adaptive batching answers a whole batch with one request's error, and the
    layer's retry, one request at a time, narrows that but does not rule it out (docs/batching.md)."""
    oip = deployed["oip"]
    together, one_by_one = concurrently_and_one_by_one(
        oip.batched_url, infer_bodies(mixed_row_counts(iris[1]) + [[[42, 3, 5, 2]]]))
    assert [status for status, _ in together] == [200] * 15 + [422], together
    assert together[:15] == one_by_one[:15]
    assert "cannot predict these inputs (it predicts others)" in together[15][1]["error"]
    metrics = from_the_network(oip.gateway, f"http://{oip.batched}:8082/metrics")
    samples = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if line.startswith("oip_batch_size"))
    # No request has more than 3 rows: a call of more stacked several.
    assert float(samples['oip_batch_size_bucket{le="4.0"}']) < float(samples["oip_batch_size_count"]), samples


POST_FROM_THE_NETWORK = ("import sys,urllib.request,urllib.error\n"
                         "request = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(),"
                         " headers={'Content-Type': 'application/json'})\n"
                         "try: answer = urllib.request.urlopen(request, timeout=10)\n"
                         "except urllib.error.HTTPError as error: answer = error\n"
                         "sys.stdout.write(f'{answer.status} {answer.read().decode()}')")


@pytest.fixture(scope="module")
def schema_replicas(docker_engine, iris):
    """{runtime: URL} of a replica per runtime, published on loopback, serving the iris model with a manifest
    that records its schema."""
    engine = Engine()
    names = load_iris().feature_names
    manifest = {"task": "classification", "schema": {"features": [{"name": name, "type": "float"} for name in names],
                                                     "label": {"name": "species", "type": "int"}}}
    try:
        source = start_model_source(engine)
        pin = source.mlflow.register(MODEL, pickle.dumps(iris[0]), manifest)
        replicas = {runtime: start_replica(engine, source, f"serving-{runtime}-schema", pin, runtime)
                    for runtime in RUNTIMES}
        engine.wait_healthy(*replicas.values(), timeout_s=240)
        yield {runtime: gateway_url(engine, replica) for runtime, replica in replicas.items()}
    finally:
        engine.remove_all()


@pytest.mark.parametrize("schema_runtime", RUNTIMES)
def test_a_model_with_a_schema_takes_one_named_input_per_feature_on_both_runtimes(schema_replicas, schema_runtime, iris):
    model, features = iris
    names = load_iris().feature_names
    client = triton.InferenceServerClient(schema_replicas[schema_runtime].removeprefix("http://"))
    try:
        metadata = client.get_model_metadata(MODEL)
        assert metadata["inputs"] == [{"name": name, "datatype": "FP64", "shape": [-1]} for name in names]
        rows = features[::9]
        # Columns in reverse order, one of them JSON, the others binary, as tritonclient sends a table.
        columns = []
        for index in reversed(range(len(names))):
            column = triton.InferInput(names[index], [len(rows)], "FP64")
            column.set_data_from_numpy(rows[:, index].copy(), binary_data=index != 1)
            columns.append(column)
        assert client.infer(MODEL, columns).as_numpy("predict").ravel().tolist() == model.predict(rows).tolist()
        tensor = triton_infer(client, rows, binary_input=True, binary_output=None)
        assert tensor.as_numpy("predict").ravel().tolist() == model.predict(rows).tolist()
        with pytest.raises(InferenceServerException) as missing:
            client.infer(MODEL, columns[1:])
        assert missing.value.status() == "400"
        assert missing.value.message() == (
            "missing 'petal width (cm)'; expected one input per feature: sepal length (cm), sepal width (cm), "
            "petal length (cm), petal width (cm) (or one FP32 or FP64 tensor [N, 4])")
    finally:
        client.close()

