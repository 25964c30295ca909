"""A lean Open Inference Protocol (V2) REST server for one scikit-learn model, as a bare ASGI app.

No web framework: routing is a handful of paths, and every microsecond of framework overhead shows up
in throughput under a one-CPU limit. A small request is decoded and predicted on the event loop: that
takes far less time than a hop to a thread would. A body over OFF_LOOP_BYTES is decoded and predicted
on one worker thread instead, so the loop keeps answering small requests meanwhile: parsing a 1 MiB JSON
body takes tens of milliseconds, and the parsers hold the GIL per call, not for the whole request. (Small
requests' p99 during 1 MiB JSON uploads: 39-61 ms decoded on the loop, 7-17 ms on the thread; see the
Attacks table of docs/reliability.md.) With `serving.batching`, small requests that arrive together share
one `predict` call (serving/batching.py); a large body is a batch of its own.
"""
from __future__ import annotations

import asyncio
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from serving.batching import UNBATCHED, Batcher, BatchingSettings, Outcome
from serving.drift import DriftMonitor
from serving.protocol import (
    BINARY_EXTENSION,
    JSON_CONTENT,
    BadRequest,
    InferRequest,
    Receive,
    Send,
    decode_infer_request,
    encode_infer_response,
    error_body,
    json_length,
    model_metadata,
    output_datatype,
    read_body,
    respond,
)
from serving.readiness import Readiness
from serving.sampling import RequestSampler
from serving.schema import ModelSchema

SERVER_METADATA = orjson.dumps({"name": "mlops-oip", "version": "1", "extensions": [BINARY_EXTENSION]})
MODEL_PATH = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<action>/ready|/infer)?$")
OUTPUT = "predict"
OFF_LOOP_BYTES = 64 * 1024


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    headers: list[tuple[bytes, bytes]]
    rows: int = 0
    failure: str = ""
    """What the model raised, for a 500."""


class InferenceApp:
    """Serves `model` as `name` version `version` over V2 REST; `metrics` is exported on a port of its own.
    `schema` (from the model's manifest; none for a model registered without one) says which inputs requests
    may name. With `drift`, every predicted batch also feeds the input drift scores; with `sampler`, a share of its rows is
    kept with the predictions; `batching` stacks concurrent requests' rows into one predict call."""

    def __init__(self, model: Any, *, name: str, version: str, sha256: str, schema: ModelSchema | None = None,
                 drift: DriftMonitor | None = None, sampler: RequestSampler | None = None,
                 batching: BatchingSettings = UNBATCHED) -> None:
        self.model = model
        self.name = name
        self.version = version
        self.n_features: int = model.n_features_in_
        self.schema = schema or ModelSchema(self.n_features)
        self.readiness = Readiness(self._test_prediction)
        # One thread: large bodies wait for each other rather than multiply their memory and GIL contention.
        self.off_loop = ThreadPoolExecutor(max_workers=1, thread_name_prefix="large-body")
        # Its own registry, not the process-global one: each app exposes exactly its own series.
        self.metrics = CollectorRegistry()
        self.requests = Counter("oip_infer_requests", "Infer requests by HTTP status", ["status"], registry=self.metrics)
        self.rows = Counter("oip_inferred_rows", "Rows predicted", registry=self.metrics)
        self.latency = Histogram("oip_infer_duration_seconds", "Infer request handling time, parse to response",
                                 registry=self.metrics,
                                 buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self.batch_size = Histogram("oip_batch_size", "Rows per predict call: a request's own, or several "
                                                      "requests' when batched together", registry=self.metrics,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 16384))
        self.batcher = Batcher(model.predict, batching, self.batch_size.observe)
        Gauge("oip_model_info", "The model this replica serves", ["name", "version", "sha256"],
              registry=self.metrics).labels(name, version, sha256).set(1)
        self.drift = drift
        if drift is not None:
            self.metrics.register(drift)
        self.sampler = sampler
        for counter in sampler.counters if sampler is not None else ():
            self.metrics.register(counter)
        self.metadata = model_metadata(name, version, self.schema, getattr(model, "classes_", None), [-1])

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        if path == "/v2/health/live":
            await _respond(send, Answer(200, b"", [JSON_CONTENT]))
        elif path == "/v2/health/ready":
            await self._ready(send)
        elif path == "/v2":
            await _respond(send, Answer(200, SERVER_METADATA, [JSON_CONTENT]))
        elif (match := MODEL_PATH.match(path)) is None:
            await _error(send, 404, f"no route {path}")
        elif match["name"] != self.name or match["version"] not in (None, self.version):
            await _error(send, 404, f"model {match['name']} version {match['version'] or 'any'} is not served here; "
                                    f"this replica serves {self.name} version {self.version}")
        elif match["action"] == "/infer":
            if method != "POST":
                await _error(send, 405, "infer takes POST")
                return
            await self._infer(scope, receive, send)
        elif method != "GET":
            await _error(send, 405, f"{path} takes GET")
        elif match["action"] == "/ready":
            await self._ready(send)
        else:
            await _respond(send, Answer(200, self.metadata, [JSON_CONTENT]))

    async def _ready(self, send: Send) -> None:
        if await self.readiness.ready():
            await _respond(send, Answer(200, b"", [JSON_CONTENT]))
        else:
            await _error(send, 503, f"model {self.name} v{self.version} failed its test prediction")

    async def _test_prediction(self) -> None:
        predictions = np.asarray(self.model.predict(np.zeros((1, self.n_features))))
        if len(predictions) != 1:
            raise ValueError(f"one row gave {len(predictions)} predictions")

    async def _infer(self, scope: dict, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        try:
            with self.batcher.arriving_request():
                body = await read_body(scope, receive)
                header_length = json_length(scope["headers"])
        except BadRequest as error:
            answer = Answer(error.status, error_body(str(error)), [JSON_CONTENT])
        else:
            if len(body) > OFF_LOOP_BYTES:
                answer = await asyncio.get_running_loop().run_in_executor(self.off_loop, self.answer_alone, body,
                                                                          header_length)
            else:
                answer = await self.answer_batched(body, header_length)
        if answer.status == 200:
            self.readiness.record_success()
        elif answer.status == 500 and not await self.readiness.model_at_fault():
            answer = Answer(422, error_body(f"model {self.name} v{self.version} cannot predict these inputs "
                                            f"(it predicts others): {answer.failure}"), [JSON_CONTENT])
        await _respond(send, answer)
        self.requests.labels(str(answer.status)).inc()
        if answer.status == 200:
            self.rows.inc(answer.rows)
            self.latency.observe(time.perf_counter() - started)

    async def answer_batched(self, body: bytes, header_length: int | None) -> Answer:
        request = self._decode(body, header_length)
        if isinstance(request, Answer):
            return request
        return self._answer(request, await self.batcher.predict(request.features))

    def answer_alone(self, body: bytes, header_length: int | None) -> Answer:
        """Decoded, predicted and encoded in one call, on whichever thread calls it."""
        request = self._decode(body, header_length)
        if isinstance(request, Answer):
            return request
        [outcome] = self.batcher.predict_now([request.features])
        return self._answer(request, outcome)

    def _decode(self, body: bytes, header_length: int | None) -> InferRequest | Answer:
        """The request, or the answer refusing it."""
        try:
            request = decode_infer_request(body, header_length, self.schema)
            unknown = set(request.binary_by_output) - {OUTPUT}
            if unknown:
                raise BadRequest(f"this model has one output, '{OUTPUT}'; no output {', '.join(sorted(unknown))}")
        except BadRequest as error:
            return Answer(error.status, error_body(str(error)), [JSON_CONTENT])
        return request

    def _answer(self, request: InferRequest, outcome: Outcome) -> Answer:
        if isinstance(outcome, Exception):  # the caller gets the model's message, not a dropped connection
            return Answer(500, error_body(f"model {self.name} v{self.version} failed to predict: {outcome}"),
                          [JSON_CONTENT], failure=f"{type(outcome).__name__}: {outcome}")
        if self.drift is not None:
            self.drift.observe(request.features, outcome)
        if self.sampler is not None:
            self.sampler.observe(request.features, outcome)
        response: dict[str, Any] = {"model_name": self.name, "model_version": self.version}
        if request.id is not None:
            response["id"] = request.id
        body, headers = encode_infer_response(response, [(OUTPUT, output_datatype(outcome.dtype), outcome)], request)
        return Answer(200, body, headers, rows=len(outcome))


async def _respond(send: Send, answer: Answer) -> None:
    await respond(send, answer.status, answer.body, answer.headers)


async def _error(send: Send, status: int, message: str) -> None:
    await _respond(send, Answer(status, error_body(message), [JSON_CONTENT]))
