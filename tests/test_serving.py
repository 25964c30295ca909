"""The serving image's logic in-process: the V2 app on a real scikit-learn model, and the registry fetch
against a stand-in for the MLflow REST endpoints it uses."""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import http.server
import json
import os
import pickle
import socket
import sys
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Sequence
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
import skops.io
import tritonclient.http
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from prometheus_client import generate_latest
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier

from mlops_spec.contract import SIGNATURE_TAG
from mlops_spec.project import REPO_ROOT
from tests.model_signing import ModelSigner, manifest_of

sys.path.insert(0, str(REPO_ROOT / "images" / "serving"))
from serving import __main__ as oip_runtime  # noqa: E402
from serving.app import OFF_LOOP_BYTES, InferenceApp  # noqa: E402
from serving.batching import BatchingSettings  # noqa: E402
from serving.protocol import MAX_BODY_BYTES  # noqa: E402
from serving.readiness import FAILURES_BEFORE_UNREADY  # noqa: E402
from serving.registry import MlflowRegistry, ModelPin, ModelRefused, RegistryUnreachable, trusted_keys  # noqa: E402
from serving.sampling import RequestSampler  # noqa: E402
from serving.startup import fetch_pinned_model, loaded_model  # noqa: E402

TREE = "sklearn.tree._tree.Tree"
"""The one type of a tree model skops leaves to review."""


@pytest.fixture(scope="module")
def iris():
    features, labels = load_iris(return_X_y=True)
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(features, labels), features


@pytest.fixture
def app(iris):
    return InferenceApp(iris[0], name="iris-classifier", version="3", sha256="ab" * 32)


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def json(self):
        return json.loads(self.body)


def call(app: InferenceApp, method: str, path: str, body: bytes = b"",
         headers: tuple[tuple[bytes, bytes], ...] = ()) -> Response:
    """One HTTP exchange with the ASGI app, as uvicorn would drive it."""
    return asyncio.run(exchange(app, method, path, body, headers))


async def exchange(app: InferenceApp, method: str, path: str, body: bytes = b"",
                   headers: tuple[tuple[bytes, bytes], ...] = (), body_delay_s: float = 0) -> Response:
    """One HTTP exchange with the ASGI app; the body comes `body_delay_s` after the headers."""
    sent: list[dict] = []

    async def receive() -> dict:
        if body_delay_s:
            await asyncio.sleep(body_delay_s)
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    declared = () if any(key == b"content-length" for key, _ in headers) else ((b"content-length", str(len(body)).encode()),)
    scope = {"type": "http", "method": method, "path": path, "headers": [*declared, *headers]}
    await app(scope, receive, send)
    return Response(sent[0]["status"], dict(sent[0]["headers"]), sent[1]["body"])


def infer_body(rows, datatype: str = "FP32", shape=None, **extra) -> bytes:
    tensor = {"name": "input-0", "datatype": datatype, "shape": shape or [len(rows), len(rows[0])], "data": rows}
    return json.dumps({"inputs": [tensor], **extra}).encode()


INFER = "/v2/models/iris-classifier/infer"


def test_infer_answers_the_models_predictions(app, iris):
    model, features = iris
    rows = features[::10].tolist()
    answer = call(app, "POST", INFER, infer_body(rows, id="req-7"))
    assert answer.status == 200
    response = answer.json()
    assert response["model_name"] == "iris-classifier" and response["model_version"] == "3"
    assert response["id"] == "req-7"
    [output] = response["outputs"]
    assert output["datatype"] == "INT64" and output["shape"] == [len(rows)]
    assert output["data"] == model.predict(np.asarray(rows, dtype=np.float32)).tolist()


def test_infer_takes_flat_fp64_data_and_the_versioned_path(app, iris):
    model, features = iris
    rows = features[:4]
    body = infer_body(rows.ravel().tolist(), datatype="FP64", shape=[4, 4])
    answer = call(app, "POST", "/v2/models/iris-classifier/versions/3/infer", body)
    assert answer.status == 200
    assert answer.json()["outputs"][0]["data"] == model.predict(rows).tolist()


def triton_request(rows: np.ndarray, *, binary_input: bool, binary_output: bool | None,
                   request_id: str = "") -> tuple[bytes, tuple]:
    """The bytes and headers tritonclient's HTTP client sends; `binary_output` None asks for no output by name
    (the client then asks for every output binary)."""
    tensor = tritonclient.http.InferInput("input-0", list(rows.shape), "FP64")
    tensor.set_data_from_numpy(rows, binary_data=binary_input)
    outputs = None if binary_output is None else [tritonclient.http.InferRequestedOutput("predict", binary_data=binary_output)]
    body, json_size = tritonclient.http.InferenceServerClient.generate_request_body([tensor], outputs=outputs,
                                                                                   request_id=request_id)
    return body, () if json_size is None else ((b"inference-header-content-length", str(json_size).encode()),)


@pytest.mark.parametrize("binary_input, binary_output", [(True, None), (True, False), (False, True), (False, False)])
def test_the_binary_tensor_extension_in_and_out_as_tritonclient_speaks_it(app, iris, binary_input, binary_output):
    model, features = iris
    rows = features[::7]
    body, headers = triton_request(rows, binary_input=binary_input, binary_output=binary_output)
    answer = call(app, "POST", INFER, body, headers)
    assert answer.status == 200, answer.body
    header_length = answer.headers.get(b"inference-header-content-length")
    assert (header_length is not None) == (binary_output is not False)
    result = tritonclient.http.InferResult.from_response_body(
        answer.body, header_length=None if header_length is None else int(header_length))
    assert result.as_numpy("predict").tolist() == model.predict(rows).tolist()
    [output] = result.get_response()["outputs"]
    assert ("data" in output) == (binary_output is False)


def test_binary_fp32_input_is_read_little_endian_row_major(app, iris):
    model, features = iris
    rows = features[:3].astype(np.float32)
    header = json.dumps({"inputs": [{"name": "input-0", "datatype": "FP32", "shape": [3, 4],
                                     "parameters": {"binary_data_size": rows.nbytes}}]}).encode()
    answer = call(app, "POST", INFER, header + rows.astype("<f4").tobytes(),
                  ((b"inference-header-content-length", str(len(header)).encode()),))
    assert answer.status == 200
    assert answer.json()["outputs"][0]["data"] == model.predict(rows).tolist()


def binary_body(size: int, payload: bytes, header_length: int | None = None) -> tuple[bytes, tuple]:
    header = json.dumps({"inputs": [{"name": "input-0", "datatype": "FP64", "shape": [1, 4],
                                     "parameters": {"binary_data_size": size}}]}).encode()
    length = len(header) if header_length is None else header_length
    return header + payload, ((b"inference-header-content-length", str(length).encode()),)


@pytest.mark.parametrize("body, headers, error", [
    (*binary_body(32, bytes(24)), "input 'input-0' binary_data_size is 32 but 24 bytes follow the JSON header"),
    (*binary_body(20, bytes(20)), "input 'input-0' has 20 binary bytes, not a whole number of FP64 values"),
    (*binary_body(32, bytes(32), header_length=10_000), "Inference-Header-Content-Length is 10000 but the body has"),
    (*binary_body(32, np.array([np.nan, 1, 2, 3]).tobytes()), "input 'input-0' has values that are not finite FP64"),
    (binary_body(32, bytes(32))[0], (), "request body is not valid JSON"),
    (infer_body([[1, 2, 3, 4]]), ((b"inference-header-content-length", b"x"),),
     "Inference-Header-Content-Length must be a byte count, got 'x'"),
])
def test_malformed_binary_requests_get_400(app, body, headers, error):
    answer = call(app, "POST", INFER, body, headers)
    assert answer.status == 400
    assert answer.json()["error"].startswith(error)


@pytest.mark.parametrize("body, error", [
    (b"{not json", "request body is not valid JSON"),
    (b'{"id": "x"}', "request body must be a JSON object with an 'inputs' list"),
    (json.dumps({"inputs": []}).encode(), "expected exactly one input tensor, got 0"),
    (json.dumps({"inputs": [{"name": "x", "shape": [1, 4]}]}).encode(),
     "the input tensor needs 'name', 'shape', 'datatype' and 'data' (or binary data)"),
    (json.dumps({"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP64"}]}).encode(),
     "input 'input-0' has neither 'data' nor a binary_data_size parameter"),
    (infer_body([[1, 2, 3, 4]], datatype="INT64"), "input 'input-0' has datatype 'INT64'; this model takes FP32 or FP64"),
    (infer_body([1, 2, 3, 4], shape=[4]), "input 'input-0' must have shape [N, features], got [4]"),
    (infer_body([], shape=[0, 4]), "input 'input-0' has shape [0, 4]: a batch needs at least one row"),
    (infer_body([[1, 2, 3]]), "input 'input-0' has 3 features; the model takes 4"),
    (infer_body([[1, 2, 3, 4]], shape=[2, 4]), "input 'input-0' has 4 values; shape [2, 4] needs 8"),
    (infer_body([["a", "b", "c", "d"]]), "input 'input-0' data must be FP32 numbers, flat or nested row-major"),
    (infer_body([["1.5", "2", "3", "4"]], datatype="FP64"), "input 'input-0' data must be FP64 numbers"),
    (infer_body([[True, False, True, True]], datatype="FP64"), "input 'input-0' data must be FP64 numbers"),
    (infer_body([[1.5, 2, True, 4]], datatype="FP64"), "input 'input-0' data must be FP64 numbers"),
    (infer_body([[1.5, 2, 3, 4], [3]], shape=[2, 4]), "input 'input-0' data must be FP32 numbers"),
    (infer_body([[10**400, 2, 3, 4]], datatype="FP64"), "request body is not valid JSON: number is infinity"),
    (infer_body([[1e39, 2, 3, 4]]), "input 'input-0' has values that are not finite FP32 numbers"),
    (infer_body([[1, 2, 3, 4]], outputs=[{"name": "predict_proba"}]),
     "this model has one output, 'predict'; no output predict_proba"),
    (infer_body([[1, 2, 3, 4]], outputs=[{"name": "predict", "parameters": {"class_count": 2}}]),
     "output 'predict' asks for classification, which this server does not offer"),
])
def test_bad_requests_get_400_with_a_v2_error_body(app, body, error):
    answer = call(app, "POST", INFER, body)
    assert answer.status == 400
    assert list(answer.json()) == ["error"] and answer.json()["error"].startswith(error)


def test_a_true_outside_the_data_does_not_refuse_numbers(app):
    body = infer_body([[1, 2, 3, 4]], datatype="FP64", parameters={"binary_data_output": False},
                      outputs=[{"name": "predict", "parameters": {"binary_data": False}}])
    assert call(app, "POST", INFER, body).status == 200


def test_bodies_over_the_limit_get_413_before_they_are_read(app):
    declared = call(app, "POST", INFER, b"{}", ((b"content-length", str(MAX_BODY_BYTES + 1).encode()),))
    assert declared.status == 413
    assert declared.json()["error"] == f"request body is larger than {MAX_BODY_BYTES} bytes; split the batch"
    assert call(app, "POST", INFER, b" " * (MAX_BODY_BYTES + 1)).status == 413


def test_large_bodies_are_answered_off_the_event_loop_the_same(app, iris, monkeypatch):
    model, features = iris
    rows = np.tile(features, (40, 1))
    body = infer_body(rows.tolist(), datatype="FP64")
    assert OFF_LOOP_BYTES < len(body) <= MAX_BODY_BYTES
    threads: list[str] = []
    answer_on_this_thread = app.answer_alone
    monkeypatch.setattr(app, "answer_alone", lambda *args: threads.append(threading.current_thread().name)
                        or answer_on_this_thread(*args))
    answer = call(app, "POST", INFER, body)
    assert answer.status == 200
    assert answer.json()["outputs"][0]["data"] == model.predict(rows).tolist()
    assert threads[0].startswith("large-body")


def test_other_models_and_versions_are_404(app):
    answer = call(app, "POST", "/v2/models/iris-classifier/versions/2/infer", infer_body([[1, 2, 3, 4]]))
    assert answer.status == 404
    assert answer.json()["error"] == ("model iris-classifier version 2 is not served here; "
                                      "this replica serves iris-classifier version 3")
    assert call(app, "GET", "/v2/models/other").status == 404
    assert call(app, "GET", "/v2/models/iris-classifier/infer").status == 405


def test_health_server_and_model_metadata(app):
    assert call(app, "GET", "/v2/health/live").status == 200
    assert call(app, "GET", "/v2/health/ready").status == 200
    assert call(app, "GET", "/v2/models/iris-classifier/ready").status == 200
    assert call(app, "GET", "/v2").json() == {"name": "mlops-oip", "version": "1", "extensions": ["binary_tensor_data"]}
    metadata = call(app, "GET", "/v2/models/iris-classifier")
    assert metadata.status == 200
    assert metadata.json() == {
        "name": "iris-classifier", "versions": ["3"], "platform": "sklearn",
        "inputs": [{"name": "input-0", "datatype": "FP64", "shape": [-1, 4]}],
        "outputs": [{"name": "predict", "datatype": "INT64", "shape": [-1]}],
    }


def test_metrics_are_not_served_on_the_api_port(app, iris):
    assert call(app, "GET", "/metrics").status == 404
    call(app, "POST", INFER, infer_body(iris[1][:5].tolist()))
    call(app, "POST", INFER, b"{")
    text = generate_latest(app.metrics).decode()
    assert 'oip_infer_requests_total{status="200"} 1.0' in text
    assert 'oip_infer_requests_total{status="400"} 1.0' in text
    assert "oip_inferred_rows_total 5.0" in text
    assert f'oip_model_info{{name="iris-classifier",sha256="{"ab" * 32}",version="3"}} 1.0' in text


def sampled(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_row_is_sampled_with_its_prediction_at_fraction_1(iris, tmp_path):
    samples = tmp_path / "dev-serving-blue-0.jsonl"
    sampler = RequestSampler(str(samples), 1.0, 1024 * 1024, model="iris-classifier", version="3")
    app = InferenceApp(iris[0], name="iris-classifier", version="3", sha256="ab" * 32, sampler=sampler)
    rows = iris[1][::7]
    assert call(app, "POST", INFER, infer_body(rows[:10].tolist(), "FP64")).status == 200
    assert call(app, "POST", INFER, infer_body(rows[10:].tolist(), "FP64")).status == 200
    call(app, "POST", INFER, b"{")  # refused requests are not sampled
    lines = sampled(samples)
    assert [line["features"] for line in lines] == rows.tolist()
    assert [line["prediction"] for line in lines] == iris[0].predict(rows).tolist()
    assert {(line["model"], line["version"]) for line in lines} == {("iris-classifier", "3")}
    assert all(isinstance(line["time"], float) for line in lines)
    assert f"mlops_samples_written_rows_total {float(len(rows))}" in generate_latest(app.metrics).decode()


def test_sampling_keeps_about_the_fraction_and_stops_at_its_cap_counting_what_it_drops(iris, tmp_path):
    samples = tmp_path / "replica.jsonl"
    rows = np.repeat(iris[1], 20, axis=0)  # 3000 rows
    predictions = iris[0].predict(rows)
    RequestSampler(str(samples), 0.1, 10**9, model="m", version="1").observe(rows, predictions)
    assert 200 < len(sampled(samples)) < 400
    samples.unlink()

    sampler = RequestSampler(str(samples), 1.0, 2000, model="m", version="1")
    for start in range(0, 40, 4):
        sampler.observe(rows[start:start + 4], predictions[start:start + 4])
    kept = len(sampled(samples))
    assert 0 < kept < 40 and samples.stat().st_size <= 2000
    assert (sampler.written._value.get(), sampler.dropped._value.get()) == (kept, 40 - kept)
    # A restarted replica goes on from its file's size: still full.
    again = RequestSampler(str(samples), 1.0, 2000, model="m", version="1")
    again.observe(rows[:4], predictions[:4])
    assert (len(sampled(samples)), again.dropped._value.get()) == (kept, 4)


class Poisonable:
    """A model that predicts like `model` until `poisoned`, then raises on every prediction."""

    def __init__(self, model) -> None:
        self.model = model
        self.n_features_in_ = model.n_features_in_
        self.classes_ = model.classes_
        self.poisoned = False

    def predict(self, features):
        if self.poisoned:
            raise RuntimeError("poisoned")
        return self.model.predict(features)


def test_ready_only_after_a_test_prediction_and_not_after_failures_in_a_row(iris):
    model = Poisonable(iris[0])
    app = InferenceApp(model, name="iris-classifier", version="3", sha256="ab" * 32)
    model.poisoned = True
    assert call(app, "GET", "/v2/health/ready").status == 503
    assert call(app, "GET", "/v2/health/live").status == 200
    model.poisoned = False
    assert call(app, "GET", "/v2/health/ready").status == 200

    model.poisoned = True
    for _ in range(FAILURES_BEFORE_UNREADY - 1):
        assert call(app, "POST", INFER, infer_body([[1, 2, 3, 4]])).status == 500
    assert app.readiness.tested, "fewer failures in a row than the threshold keep the replica ready"
    assert call(app, "POST", INFER, infer_body([[1, 2, 3, 4]])).status == 500
    answer = call(app, "GET", "/v2/models/iris-classifier/ready")
    assert answer.status == 503
    assert answer.json()["error"] == "model iris-classifier v3 failed its test prediction"
    model.poisoned = False
    assert call(app, "GET", "/v2/health/ready").status == 200


class RaisesOnSomeInputs:
    """A model that predicts like `model` except for rows whose first feature is 42."""

    def __init__(self, model) -> None:
        self.model = model
        self.n_features_in_ = model.n_features_in_
        self.classes_ = model.classes_

    def predict(self, features):
        if (features[:, 0] == 42).any():
            raise ValueError("42 is not a sepal length")
        return self.model.predict(features)


def test_inputs_that_make_the_model_raise_get_422_and_leave_readiness_alone(iris):
    app = InferenceApp(RaisesOnSomeInputs(iris[0]), name="iris-classifier", version="3", sha256="ab" * 32)
    for _ in range(FAILURES_BEFORE_UNREADY + 1):
        answer = call(app, "POST", INFER, infer_body([[42, 3, 5, 2]]))
        assert answer.status == 422
        assert answer.json()["error"] == ("model iris-classifier v3 cannot predict these inputs (it predicts others): "
                                          "ValueError: 42 is not a sepal length")
    assert app.readiness.consecutive_failures == 0
    assert call(app, "GET", "/v2/health/ready").status == 200
    text = generate_latest(app.metrics).decode()
    assert f'oip_infer_requests_total{{status="422"}} {FAILURES_BEFORE_UNREADY + 1}.0' in text


def test_bad_requests_do_not_count_against_readiness(app):
    for _ in range(FAILURES_BEFORE_UNREADY + 1):
        assert call(app, "POST", INFER, b"{").status == 400
    assert app.readiness.consecutive_failures == 0


def batching_app(model, max_rows: int, max_wait_s: float = 0.5) -> InferenceApp:
    return InferenceApp(model, name="iris-classifier", version="3", sha256="ab" * 32,
                        batching=BatchingSettings(max_rows=max_rows, max_wait_s=max_wait_s))


def call_together(app: InferenceApp, requests: list[tuple[bytes, tuple]]) -> list[Response]:
    """Infer requests that reach the app in the same turn of its event loop, as concurrent clients' do under load."""
    async def together() -> list[Response]:
        return await asyncio.gather(*(exchange(app, "POST", INFER, body, headers) for body, headers in requests))
    return asyncio.run(together())


def batch_sizes(app: InferenceApp) -> dict[str, float]:
    """The batch size histogram's count, sum and cumulative buckets, by sample name and `le`."""
    [family] = [family for family in app.metrics.collect() if family.name == "oip_batch_size"]
    return {sample.name.removeprefix("oip_batch_size") + sample.labels.get("le", ""): sample.value
            for sample in family.samples if not sample.name.endswith("_created")}


def predictions(response: Response) -> list:
    length = response.headers.get(b"inference-header-content-length")
    result = tritonclient.http.InferResult.from_response_body(response.body, header_length=length and int(length))
    return result.as_numpy("predict").tolist()


def test_batched_requests_get_the_answers_they_get_one_by_one_json_and_binary(iris):
    model, features = iris
    requests, expected_ids = [], []
    for index, rows in enumerate([features[:1], features[1:4], features[50:52], features[100:101], features[140:145]]):
        request_id = f"req-{index}"
        if index % 2:
            requests.append(triton_request(rows, binary_input=True, binary_output=index == 1, request_id=request_id))
        else:
            requests.append((infer_body(rows.tolist(), datatype="FP64", id=request_id), ()))
        expected_ids.append(request_id)

    one_by_one = [call(batching_app(model, max_rows=1), "POST", INFER, body, headers) for body, headers in requests]
    app = batching_app(model, max_rows=64)
    batched = call_together(app, requests)

    assert batch_sizes(app)["_count"] == 1, "all five requests shared one predict call"
    assert batch_sizes(app)["_sum"] == 12
    for alone, together, request_id in zip(one_by_one, batched, expected_ids):
        assert together.status == alone.status == 200
        assert together.headers == alone.headers
        assert together.body == alone.body
        assert json.loads(together.body[:int(together.headers.get(b"inference-header-content-length", len(together.body)))])["id"] == request_id
    assert [predictions(answer) for answer in batched] == [
        model.predict(rows).tolist() for rows in (features[:1], features[1:4], features[50:52], features[100:101],
                                                  features[140:145])]


def test_the_batch_size_metric_counts_the_calls_made_closing_a_batch_at_its_row_limit_or_another_dtype(iris):
    model, features = iris
    app = batching_app(model, max_rows=8)
    rows = [features[:1], features[1:4], features[4:6], features[6:7], features[7:11], features[11:12]]
    datatypes = ["FP32", "FP32", "FP32", "FP32", "FP32", "FP64"]
    answers = call_together(app, [(infer_body(batch.tolist(), datatype=datatype), ())
                                  for batch, datatype in zip(rows, datatypes)])
    assert [answer.json()["outputs"][0]["data"] for answer in answers] == [
        model.predict(batch.astype(np.float32 if datatype == "FP32" else np.float64)).tolist()
        for batch, datatype in zip(rows, datatypes)]
    # 1+3+2+1 rows fill 7 of 8; the next 4 would pass 8 and start a batch; the FP64 row starts another.
    assert batch_sizes(app) == {"_count": 3, "_sum": 12, **{f"_bucket{le}": count for le, count in [
        ("1.0", 1), ("2.0", 1), ("4.0", 2), ("8.0", 3), ("16.0", 3), ("+Inf", 3)]},
        **{f"_bucket{le}": 3 for le in ("32.0", "64.0", "128.0", "256.0", "1024.0", "4096.0", "16384.0")}}


def test_a_request_whose_rows_make_the_model_fail_fails_alone_in_its_batch(iris):
    model, features = iris
    app = batching_app(RaisesOnSomeInputs(model), max_rows=64)
    bodies = [features[:2].tolist(), [[42, 3, 5, 2]], features[60:61].tolist(), features[120:123].tolist()]
    answers = call_together(app, [(infer_body(rows, datatype="FP64", id=f"req-{index}"), ())
                                  for index, rows in enumerate(bodies)])
    assert [answer.status for answer in answers] == [200, 422, 200, 200]
    assert answers[1].json()["error"] == ("model iris-classifier v3 cannot predict these inputs (it predicts others): "
                                          "ValueError: 42 is not a sepal length")
    for index in (0, 2, 3):
        assert answers[index].json()["id"] == f"req-{index}"
        assert answers[index].json()["outputs"][0]["data"] == model.predict(np.asarray(bodies[index])).tolist()
    # The stacked call failed, then each request was predicted on its own.
    assert batch_sizes(app)["_count"] == 1 + len(bodies)
    assert app.readiness.consecutive_failures == 0


def test_a_single_client_never_waits_for_company(iris):
    model, features = iris
    app = batching_app(model, max_rows=64, max_wait_s=0.5)

    async def one_client() -> list[float]:
        took = []
        for index in range(20):
            started = time.perf_counter()
            answer = await exchange(app, "POST", INFER, infer_body(features[index:index + 1].tolist()))
            took.append(time.perf_counter() - started)
            assert answer.status == 200
        return took

    took = asyncio.run(one_client())
    assert sum(took) < 0.5, f"20 requests one after the other took {sum(took):.3f} s: someone waited for company"
    assert batch_sizes(app)["_count"] == 20 and batch_sizes(app)["_bucket1.0"] == 20


def test_a_batch_waits_for_a_request_on_its_way_in_at_most_the_declared_time(iris):
    model, features = iris
    app = batching_app(model, max_rows=64, max_wait_s=0.2)

    async def timed(body_delay_s: float, rows: np.ndarray) -> tuple[float, Response]:
        started = time.perf_counter()
        answer = await exchange(app, "POST", INFER, infer_body(rows.tolist()), body_delay_s=body_delay_s)
        return time.perf_counter() - started, answer

    async def quick_and_slow_uploads() -> Sequence[tuple[float, Response]]:
        return await asyncio.gather(timed(0, features[:2]), timed(0.05, features[2:3]), timed(1.5, features[3:4]))

    (quick, quick_answer), (soon, soon_answer), (slow, slow_answer) = asyncio.run(quick_and_slow_uploads())
    assert quick_answer.status == soon_answer.status == slow_answer.status == 200
    # The first two shared a call at the batch's deadline; the third, still uploading then, went alone.
    assert 0.2 <= quick < 1.0 and 0.2 <= soon < 1.0, (quick, soon)
    assert slow >= 1.5
    assert batch_sizes(app) == {**batch_sizes(app), "_count": 2, "_bucket1.0": 1, "_bucket2.0": 1, "_bucket4.0": 2}


@dataclass
class FakeVersion:
    """A registered version: its run's files (a run without a manifest answers 404 for it) and its tags."""
    run_id: str
    payload: bytes
    manifest: bytes | None
    tags: dict[str, str]
    skops: bytes | None = None


class FakeMlflow(http.server.ThreadingHTTPServer):
    """The MLflow REST endpoints serving uses, over the registered versions of one model."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.signer = ModelSigner()
        """The stage's signing key: the one its replicas trust."""
        self.versions: dict[str, FakeVersion] = {}
        self.authorization: str | None = None
        """When set, the Authorization header every request must carry (else 401, as MLflow's basic-auth app)."""
        self.requested: list[str] = []
        """The path of every request, in order."""
        super().__init__(("127.0.0.1", 0), FakeMlflowHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def register(self, version: str, payload: bytes, *, signer: ModelSigner | None = None,
                 signed_as: str | None = None, skops: tuple[bytes, list[str]] | None = None,
                 **manifest_fields: object) -> FakeVersion:
        """`payload` as `version`, with a manifest that describes it (and its `skops` form: the file and its
        trusted types, where given) and holds `manifest_fields`, signed by `signer` (the stage's own key unless
        told) for the model `signed_as` (this one unless told)."""
        described = {"sha256": hashlib.sha256(skops[0]).hexdigest(), "trusted_types": skops[1]} if skops else None
        manifest = manifest_of(payload, skops=described, **manifest_fields)
        tags = (signer or self.signer).tags(signed_as or self.name, payload, manifest)
        self.versions[version] = FakeVersion(f"run{version}", payload, manifest, tags, skops[0] if skops else None)
        return self.versions[version]

    def version_json(self, version: str) -> dict:
        registered = self.versions[version]
        return {"name": self.name, "version": version, "run_id": registered.run_id,
                "tags": [{"key": key, "value": value} for key, value in registered.tags.items()]}

    def downloaded(self) -> list[str]:
        return [path.rsplit("/", 1)[-1] for path in self.requested if "/mlflow-artifacts/" in path]


class FakeMlflowHandler(http.server.BaseHTTPRequestHandler):
    server: FakeMlflow

    def do_GET(self) -> None:
        if self.server.authorization is not None and self.headers.get("Authorization") != self.server.authorization:
            self.send_error(401)
            return
        url = urlsplit(self.path)
        self.server.requested.append(url.path)
        query = {key: values[0] for key, values in parse_qs(url.query).items()}
        runs = {registered.run_id: registered for registered in self.server.versions.values()}
        artifact = url.path.removeprefix("/api/2.0/mlflow-artifacts/artifacts/1/").split("/")
        if url.path == "/api/2.0/mlflow/model-versions/get" and query["version"] in self.server.versions:
            self.answer({"model_version": self.server.version_json(query["version"])})
        elif url.path == "/api/2.0/mlflow/model-versions/search":
            named = query["filter"] == f"name='{self.server.name}'"
            self.answer({"model_versions": [self.server.version_json(version) for version in self.server.versions
                                            if named]})
        elif url.path == "/api/2.0/mlflow/runs/get":
            self.answer({"run": {"info": {"artifact_uri": f"mlflow-artifacts:/1/{query['run_id']}/artifacts"}}})
        elif artifact[1:3] == ["artifacts", "model"] and artifact[0] in runs:
            registered = runs[artifact[0]]
            body = {"model.pkl": registered.payload, "manifest.json": registered.manifest,
                    "model.skops": registered.skops}[artifact[3]]
            self.answer(body) if body is not None else self.send_error(404)
        else:
            self.send_error(404)

    def answer(self, body: dict | bytes) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def registry(iris):
    """A fake MLflow holding two signed versions of iris-classifier: 2 (some other bytes) and 10 (the model)."""
    payload = pickle.dumps(iris[0])
    server = FakeMlflow("iris-classifier")
    server.register("2", b"older model")
    server.register("10", payload)
    yield server, payload, hashlib.sha256(payload).hexdigest()
    server.shutdown()
    server.server_close()


def test_fetch_serves_a_signed_pinned_version_with_its_manifest(registry):
    server, payload, sha256 = registry
    fetched = MlflowRegistry(server.url, trusted=server.signer.trusted).fetch(ModelPin("iris-classifier", "10", sha256))
    assert (fetched.version, fetched.sha256, fetched.payload) == ("10", sha256, payload)
    assert fetched.manifest == json.loads(server.versions["10"].manifest or b"")


def test_latest_is_the_highest_version_and_unpinned_fetches_skip_only_the_pin(registry):
    server, payload, _ = registry
    assert MlflowRegistry(server.url, trusted=server.signer.trusted).fetch(ModelPin("iris-classifier", "latest", "")).payload == payload


def test_latest_skips_newer_versions_no_trusted_key_signed(registry, caplog):
    server, payload, _ = registry
    unsigned = server.register("11", b"a writer's model")
    del unsigned.tags[SIGNATURE_TAG]
    server.register("12", b"another writer's model", signer=ModelSigner())
    fetched = MlflowRegistry(server.url, trusted=server.signer.trusted).fetch(ModelPin("iris-classifier", "latest", ""))
    assert (fetched.version, fetched.payload) == ("10", payload)
    assert server.downloaded() == ["manifest.json", "model.pkl"], "only the served version's files are read"
    assert "not serving the newer version: refusing model iris-classifier v12: its signature verifies with none of the 1 keys" in caplog.text
    assert "not serving the newer version: refusing model iris-classifier v11: the version has no signature tag" in caplog.text


def test_latest_without_any_signed_version_is_refused(registry):
    server, _, _ = registry
    with pytest.raises(ModelRefused, match="refusing model iris-classifier latest: none of its 2 versions is signed "
                                           "by a key in MODEL_SIGNING_KEYS"):
        MlflowRegistry(server.url, trusted=ModelSigner().trusted).fetch(ModelPin("iris-classifier", "latest", ""))


def unsigned(server: FakeMlflow, payload: bytes) -> None:
    del server.register("11", payload).tags[SIGNATURE_TAG]


def without_hashes(server: FakeMlflow, payload: bytes) -> None:
    server.register("11", payload).tags.clear()


def signed_by_another_key(server: FakeMlflow, payload: bytes) -> None:
    server.register("11", payload, signer=ModelSigner())


def signed_for_another_model(server: FakeMlflow, payload: bytes) -> None:
    server.register("11", payload, signed_as="diabetes-regressor")


def signature_not_base64(server: FakeMlflow, payload: bytes) -> None:
    server.register("11", payload).tags[SIGNATURE_TAG] = "not base64!"


def tampered_manifest(server: FakeMlflow, payload: bytes) -> None:
    registered = server.register("11", payload)
    registered.manifest = manifest_of(payload, reference_profile={"rows": 1})


def no_manifest(server: FakeMlflow, payload: bytes) -> None:
    server.register("11", payload).manifest = None


def other_model_bytes(server: FakeMlflow, payload: bytes) -> None:
    server.register("11", b"the signed model").payload = payload


REFUSALS = {
    unsigned: ("the version has no signature tag", []),
    without_hashes: ("the version has no sha256 or manifest_sha256 or signature tag", []),
    signed_by_another_key: ("its signature verifies with none of the 1 keys in MODEL_SIGNING_KEYS", []),
    signed_for_another_model: ("its signature verifies with none of the 1 keys in MODEL_SIGNING_KEYS", []),
    signature_not_base64: ("its signature tag is not base64", []),
    tampered_manifest: ("model/manifest.json has sha256 [0-9a-f]{64}, not the signed manifest_sha256 tag",
                        ["manifest.json"]),
    no_manifest: ("model/manifest.json: model registry refused .*: HTTP 404", ["manifest.json"]),
    other_model_bytes: ("sha256 [0-9a-f]{64} does not match the registry's signed sha256 tag",
                        ["manifest.json", "model.pkl"]),
}


@pytest.mark.parametrize("make_version", REFUSALS, ids=lambda make_version: make_version.__name__)
def test_a_version_not_exactly_as_signed_is_refused_and_what_no_key_signed_is_never_downloaded(registry, make_version):
    server, payload, _ = registry
    make_version(server, payload)
    reason, downloaded = REFUSALS[make_version]
    with pytest.raises(ModelRefused, match=f"^refusing model iris-classifier v11: {reason}"):
        MlflowRegistry(server.url, trusted=server.signer.trusted, sleep=pytest.fail).fetch(
            ModelPin("iris-classifier", "11", ""))
    assert server.downloaded() == downloaded


def test_a_manifest_that_describes_another_model_is_refused(registry):
    server, payload, _ = registry
    registered = server.versions["10"]
    registered.manifest = manifest_of(b"another model")
    registered.tags = server.signer.tags("iris-classifier", payload, registered.manifest)
    with pytest.raises(ModelRefused, match="refusing model iris-classifier v10: model/manifest.json does not describe"):
        MlflowRegistry(server.url, trusted=server.signer.trusted).fetch(ModelPin("iris-classifier", "10", ""))


def test_a_replica_trusts_every_key_of_its_stage(registry):
    server, payload, sha256 = registry
    rotated = ModelSigner()
    server.register("11", payload, signer=rotated)
    keys = trusted_keys(server.signer.public_pem + rotated.public_pem)
    assert MlflowRegistry(server.url, trusted=keys).fetch(ModelPin("iris-classifier", "11", sha256)).payload == payload


def test_sha256_mismatch_refuses(registry):
    server, _, sha256 = registry
    with pytest.raises(ModelRefused) as refusal:
        MlflowRegistry(server.url, trusted=server.signer.trusted).fetch(ModelPin("iris-classifier", "10", "0" * 64))
    assert str(refusal.value) == f"refusing model iris-classifier v10: sha256 {sha256} does not match pinned {'0' * 64}"


def test_fetch_logs_in_as_the_given_user(registry):
    server, payload, sha256 = registry
    server.authorization = "Basic " + base64.b64encode(b"reader:r34d").decode()
    with pytest.raises(ModelRefused, match="HTTP 401"):
        MlflowRegistry(server.url, trusted=server.signer.trusted,
                       sleep=pytest.fail).fetch(ModelPin("iris-classifier", "10", sha256))
    fetched = MlflowRegistry(server.url, trusted=server.signer.trusted, username="reader",
                             password="r34d").fetch(ModelPin("iris-classifier", "10", sha256))
    assert fetched.payload == payload


def test_unknown_version_is_refused_without_retrying(registry):
    server, _, _ = registry
    with pytest.raises(ModelRefused, match="HTTP 404"):
        MlflowRegistry(server.url, trusted=server.signer.trusted,
                       sleep=pytest.fail).fetch(ModelPin("iris-classifier", "99", ""))


def test_unreachable_registry_is_retried_a_bounded_number_of_times(caplog):
    with socket_without_listener() as url:
        waits: list[float] = []
        with pytest.raises(RegistryUnreachable, match="not reachable after 3 attempts"):
            MlflowRegistry(url, trusted=[], attempts=3, retry_delay_s=2, sleep=waits.append).fetch(ModelPin("m", "1", ""))
    assert waits == [2, 2]
    assert "not reachable yet" in caplog.text and "retry 1/2 in 2s" in caplog.text


def replica_env(monkeypatch, server: FakeMlflow, version: str, sha256: str = "") -> None:
    for key, value in {"MODEL_NAME": "iris-classifier", "MODEL_VERSION": version, "MODEL_SHA256": sha256,
                       "MLFLOW_TRACKING_URI": server.url, "MODEL_SIGNING_KEYS": server.signer.public_pem}.items():
        monkeypatch.setenv(key, value)


def test_startup_exits_non_zero_with_one_clear_line_on_mismatch(registry, monkeypatch, caplog):
    server, _, sha256 = registry
    replica_env(monkeypatch, server, "10", "0" * 64)
    with pytest.raises(SystemExit) as exit_:
        fetch_pinned_model("oip")
    assert exit_.value.code != 0
    assert f"refusing model iris-classifier v10: sha256 {sha256} does not match pinned {'0' * 64}" in caplog.text


class WritesWhenUnpickled:
    """A payload whose unpickling creates the folder `marker`: code a writer's password would run in a replica."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("make_version", [unsigned, signed_by_another_key, signed_for_another_model, tampered_manifest,
                                          other_model_bytes], ids=lambda make_version: make_version.__name__)
def test_the_oip_runtime_exits_before_unpickling_a_version_nobody_trusted_signed(registry, monkeypatch, caplog,
                                                                                  tmp_path, make_version):
    server, _, _ = registry
    marker = tmp_path / "ran"
    payload = pickle.dumps(WritesWhenUnpickled(str(marker)))
    make_version(server, payload)
    replica_env(monkeypatch, server, "11")
    with pytest.raises(SystemExit) as exit_:
        oip_runtime.main()
    assert exit_.value.code != 0
    assert not marker.exists(), "the payload was unpickled"
    [refusal] = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert refusal.startswith("refusing model iris-classifier v11: ")
    pickle.loads(payload)
    assert marker.is_dir(), "the payload runs code when unpickled"


@pytest.fixture(scope="module")
def tree_skops(iris):
    """A model skops leaves one type of to review (its trees' `Tree`), in skops's format, and the rows it takes."""
    features = iris[1]
    tree = DecisionTreeClassifier(random_state=0).fit(features, load_iris().target)
    return tree, skops.io.dumps(tree), features


def skops_version(server: FakeMlflow, tree_skops, marker, trusted_types=(TREE,)) -> None:
    """Version 11: a pickle that runs code when unpickled, offered as a skops form too, all of it signed."""
    server.register("11", pickle.dumps(WritesWhenUnpickled(str(marker))), skops=(tree_skops[1], list(trusted_types)))


def test_a_replica_loads_the_signed_skops_form_and_never_fetches_the_pickle(registry, monkeypatch, tmp_path,
                                                                           tree_skops, caplog):
    server, _, _ = registry
    skops_version(server, tree_skops, tmp_path / "ran")
    replica_env(monkeypatch, server, "11", server.versions["11"].tags["sha256"])
    caplog.set_level("INFO")
    fetched = fetch_pinned_model("oip")
    model = loaded_model(fetched)
    assert np.array_equal(model.predict(tree_skops[2]), tree_skops[0].predict(tree_skops[2]))
    assert (fetched.sha256, fetched.skops_trusted_types) == (server.versions["11"].tags["sha256"], (TREE,))
    assert "model.pkl" not in server.downloaded() and not (tmp_path / "ran").exists()
    assert "from model.skops, loaded without pickle" in caplog.text


def skops_replaced(server: FakeMlflow, skops_bytes: bytes) -> None:
    server.versions["11"].skops = skops_bytes + b"\0"


def skops_garbled_in_manifest(server: FakeMlflow, skops_bytes: bytes) -> None:
    payload = server.versions["11"].payload
    manifest = manifest_of(payload, skops={"sha256": "not a sha256", "trusted_types": [TREE]})
    server.versions["11"] = FakeVersion("run11", payload, manifest, server.signer.tags("iris-classifier", payload,
                                                                                      manifest), skops_bytes)


def skops_of_another_pin(server: FakeMlflow, skops_bytes: bytes) -> None:
    server.versions["11"].tags["pinned"] = "0" * 64


@pytest.mark.parametrize(("make_version", "refusal"), [
    (skops_replaced, "model/model.skops has sha256 {actual}, not the {signed} the signed manifest gives it"),
    (skops_garbled_in_manifest, "model/manifest.json's outputs.skops is not {{sha256, trusted_types}}"),
    (skops_of_another_pin, "sha256 {tag} does not match pinned {pinned}"),
], ids=lambda value: getattr(value, "__name__", "message"))
def test_a_skops_form_not_exactly_as_signed_and_pinned_is_refused(registry, tree_skops, tmp_path, make_version,
                                                                 refusal):
    server, _, _ = registry
    skops_version(server, tree_skops, tmp_path / "ran")
    make_version(server, tree_skops[1])
    version = server.versions["11"]
    pinned = version.tags.pop("pinned", version.tags["sha256"])
    with pytest.raises(ModelRefused) as refused:
        MlflowRegistry(server.url, trusted=server.signer.trusted).fetch(ModelPin("iris-classifier", "11", pinned))
    assert str(refused.value) == "refusing model iris-classifier v11: " + refusal.format(
        actual=hashlib.sha256(version.skops or b"").hexdigest(), signed=hashlib.sha256(tree_skops[1]).hexdigest(),
        tag=version.tags["sha256"], pinned=pinned)
    assert "model.pkl" not in server.downloaded() and not (tmp_path / "ran").exists()


def test_a_skops_form_holding_a_type_its_signed_manifest_does_not_trust_exits_before_it_is_built(
        registry, monkeypatch, tmp_path, tree_skops, caplog):
    server, _, _ = registry
    skops_version(server, tree_skops, tmp_path / "ran", trusted_types=())
    replica_env(monkeypatch, server, "11")
    with pytest.raises(SystemExit) as exit_:
        oip_runtime.main()
    assert exit_.value.code != 0
    [refusal] = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert refusal == (f"refusing model iris-classifier v11: model.skops holds types neither skops nor its signed "
                       f"manifest trusts: {TREE}")
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("keys", ["", "-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n",
                                  rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
                                  .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo).decode()],
                         ids=["none", "garbled", "rsa"])
def test_a_replica_without_a_key_it_can_trust_refuses_to_start(registry, monkeypatch, caplog, keys):
    server, _, sha256 = registry
    replica_env(monkeypatch, server, "10", sha256)
    monkeypatch.setenv("MODEL_SIGNING_KEYS", keys)
    with pytest.raises(SystemExit) as exit_:
        fetch_pinned_model("oip")
    assert exit_.value.code != 0
    [refusal] = [record.getMessage() for record in caplog.records if record.levelname == "ERROR"]
    assert "MODEL_SIGNING_KEYS" in refusal and "mlops:trustedModelKeys" in refusal
    assert server.requested == [], "nothing is fetched without a key to check it by"


@contextlib.contextmanager
def socket_without_listener() -> Iterator[str]:
    """A loopback URL whose port is bound but not listening, so connections are refused at once."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{bound.getsockname()[1]}"


def test_startup_refuses_a_runtime_other_than_the_images_own(monkeypatch, caplog):
    monkeypatch.setenv("SERVING_RUNTIME", "mlserver")
    with pytest.raises(SystemExit) as exit_:
        fetch_pinned_model("oip")
    assert exit_.value.code != 0
    assert "SERVING_RUNTIME is mlserver but this image is the oip build target" in caplog.text
