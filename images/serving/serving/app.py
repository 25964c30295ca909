"""A lean Open Inference Protocol (V2) REST server for one scikit-learn model, as a bare ASGI app.

No web framework: routing is a handful of paths, and every microsecond of framework overhead shows up
in throughput under a one-CPU limit. Prediction runs on the event loop: a small model predicts in far
less time than a hop to a thread pool would take.
"""
from __future__ import annotations

import re
import time
from typing import Any, Awaitable, Callable

import numpy as np
import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

INPUT_DTYPES = {"FP32": np.float32, "FP64": np.float64}
OUTPUT_DATATYPES = {"b": "BOOL", "i": "INT64", "u": "UINT64", "f": "FP64", "U": "BYTES", "S": "BYTES", "O": "BYTES"}
MODEL_PATH = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<action>/ready|/infer)?$")
JSON_HEADERS = [(b"content-type", b"application/json")]


class BadRequest(Exception):
    """A request the client must fix; answered 400 with a V2 error body."""


def parse_infer_request(body: bytes, n_features: int | None) -> tuple[Any, np.ndarray]:
    """The request id and the one input tensor of a V2 infer request, as an [N, features] array."""
    try:
        request = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise BadRequest(f"request body is not valid JSON: {error}") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise BadRequest("request body must be a JSON object with an 'inputs' list")
    if len(request["inputs"]) != 1:
        raise BadRequest(f"expected exactly one input tensor, got {len(request['inputs'])}")
    tensor = request["inputs"][0]
    if not isinstance(tensor, dict) or not {"name", "shape", "datatype", "data"} <= tensor.keys():
        raise BadRequest("the input tensor needs 'name', 'shape', 'datatype' and 'data'")
    name, shape, datatype = tensor["name"], tensor["shape"], tensor["datatype"]
    if datatype not in INPUT_DTYPES:
        raise BadRequest(f"input '{name}' has datatype {datatype!r}; this model takes FP32 or FP64")
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in shape)):
        raise BadRequest(f"input '{name}' must have shape [N, features], got {shape!r}")
    if n_features is not None and shape[1] != n_features:
        raise BadRequest(f"input '{name}' has {shape[1]} features; the model takes {n_features}")
    try:
        with np.errstate(over="ignore"):  # an FP32 overflow becomes inf, refused below
            values = np.asarray(tensor["data"], dtype=INPUT_DTYPES[datatype])
    except (TypeError, ValueError, OverflowError):
        raise BadRequest(f"input '{name}' data must be {datatype} numbers, flat or nested row-major") from None
    if values.size != shape[0] * shape[1]:
        raise BadRequest(f"input '{name}' has {values.size} values; shape {shape} needs {shape[0] * shape[1]}")
    if not np.isfinite(values).all():
        raise BadRequest(f"input '{name}' has values that are not finite {datatype} numbers")
    return request.get("id"), values.reshape(shape)


def output_datatype(dtype: np.dtype) -> str:
    return OUTPUT_DATATYPES.get(dtype.kind, "BYTES")


def predictions_tensor(predictions: np.ndarray) -> dict:
    return {"name": "predict", "datatype": output_datatype(predictions.dtype),
            "shape": list(predictions.shape), "data": predictions.tolist()}


class InferenceApp:
    """Serves `model` as `name` version `version` over V2 REST, plus Prometheus metrics at /metrics."""

    def __init__(self, model: Any, *, name: str, version: str, sha256: str) -> None:
        self.model = model
        self.name = name
        self.version = version
        self.n_features: int | None = getattr(model, "n_features_in_", None)
        # Its own registry, not the process-global one: each app exposes exactly its own series.
        self.metrics = CollectorRegistry()
        self.requests = Counter("oip_infer_requests", "Infer requests by HTTP status", ["status"], registry=self.metrics)
        self.rows = Counter("oip_inferred_rows", "Rows predicted", registry=self.metrics)
        self.latency = Histogram("oip_infer_duration_seconds", "Infer request handling time, parse to response",
                                 registry=self.metrics,
                                 buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        Gauge("oip_model_info", "The model this replica serves", ["name", "version", "sha256"],
              registry=self.metrics).labels(name, version, sha256).set(1)
        classes = getattr(model, "classes_", None)
        self.metadata = orjson.dumps({
            "name": name, "versions": [version], "platform": "sklearn",
            "inputs": [{"name": "input-0", "datatype": "FP64", "shape": [-1, self.n_features or -1]}],
            "outputs": [{"name": "predict", "shape": [-1],
                         "datatype": "FP64" if classes is None else output_datatype(np.asarray(classes).dtype)}],
        })

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        if path in ("/v2/health/live", "/v2/health/ready"):
            await _respond(send, 200, b"", JSON_HEADERS)
        elif path == "/metrics":
            await _respond(send, 200, generate_latest(self.metrics), [(b"content-type", CONTENT_TYPE_LATEST.encode())])
        elif (match := MODEL_PATH.match(path)) is None:
            await _error(send, 404, f"no route {path}")
        elif match["name"] != self.name or match["version"] not in (None, self.version):
            await _error(send, 404, f"model {match['name']} version {match['version'] or 'any'} is not served here; "
                                    f"this replica serves {self.name} version {self.version}")
        elif match["action"] == "/infer":
            if method != "POST":
                await _error(send, 405, "infer takes POST")
                return
            await self._infer(await _body(receive), send)
        elif method != "GET":
            await _error(send, 405, f"{path} takes GET")
        elif match["action"] == "/ready":
            await _respond(send, 200, b"", JSON_HEADERS)
        else:
            await _respond(send, 200, self.metadata, JSON_HEADERS)

    async def _infer(self, body: bytes, send: Send) -> None:
        started = time.perf_counter()
        try:
            request_id, features = parse_infer_request(body, self.n_features)
        except BadRequest as error:
            self.requests.labels("400").inc()
            await _error(send, 400, str(error))
            return
        try:
            predictions = np.asarray(self.model.predict(features))
        except Exception as error:  # the model's own failure: the caller gets its message, not a dropped connection
            self.requests.labels("500").inc()
            await _error(send, 500, f"model {self.name} v{self.version} failed to predict: {error}")
            return
        response = {"model_name": self.name, "model_version": self.version, "outputs": [predictions_tensor(predictions)]}
        if request_id is not None:
            response["id"] = request_id
        await _respond(send, 200, orjson.dumps(response), JSON_HEADERS)
        self.requests.labels("200").inc()
        self.rows.inc(len(features))
        self.latency.observe(time.perf_counter() - started)


async def _body(receive: Receive) -> bytes:
    message = await receive()
    body = message.get("body", b"")
    while message.get("more_body"):
        message = await receive()
        body += message.get("body", b"")
    return body


async def _respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _error(send: Send, status: int, message: str) -> None:
    await _respond(send, status, orjson.dumps({"error": message}), JSON_HEADERS)

