"""An ASGI layer in front of MLServer's REST app, in the same process, so the `mlserver` target answers
the V2 API as the `oip` one does. What MLServer 1.7.1 does on its own, and what this layer changes:

- binary tensor data extension: MLServer parses every body as JSON and answers 422 to tritonclient's
  default requests; the layer decodes them and hands MLServer the same tensor as JSON, and encodes the
  outputs a request wants binary (MLServer answers JSON only);
- named inputs, one per feature of the model's schema (the V2 columnar form): MLServer's scikit-learn
  runtime reads one tensor, so the layer hands it the columns as one, in the schema's order;
- infer requests are checked by serving.protocol first: MLServer answers an empty batch with 500 and a
  Python traceback, and takes "1.5" and true as FP64 data;
- readiness: MLServer is ready once the model loaded; the layer also needs a test prediction
  (serving.readiness);
- GET /v2 lists the binary extension; model metadata names the version, inputs and outputs, which
  MLServer leaves empty;
- with adaptive batching, MLServer answers every request of a batch with the error of the one whose rows
  made the model raise; the layer tries each failed request again, one at a time, so that mostly only that
  one fails (not always: docs/batching.md);
- nothing but the V2 API is served: not MLServer's model repository API (/v2/repository/..., where any
  client that reaches the replica could unload the model), nor its generate, infer_stream and docs routes,
  which would bypass the checks above.
"""
from __future__ import annotations

import asyncio
import re
from typing import Any

import mlserver
import numpy as np
import orjson

from serving.protocol import (
    BINARY_EXTENSION,
    FIXED_SIZE_DATATYPES,
    JSON_CONTENT,
    JSON_LENGTH_HEADER,
    BadRequest,
    InferRequest,
    Receive,
    Send,
    decode_infer_request,
    encode_infer_response,
    error_body,
    json_infer_request,
    json_length,
    model_metadata,
    read_body,
    respond,
)
from serving.readiness import Readiness
from serving.schema import ModelSchema

MODEL_PATH = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?P<action>/ready|/infer)?$")
SERVER_METADATA = orjson.dumps({"name": "mlserver", "version": mlserver.__version__, "extensions": [BINARY_EXTENSION]})
# Set anew for the body MLServer gets; and no accept-encoding, so MLServer never compresses an answer the
# layer may have to re-encode.
REWRITTEN_HEADERS = {b"content-length", b"content-type", JSON_LENGTH_HEADER, b"accept-encoding"}


class ConformanceLayer:
    def __init__(self, mlserver_app: Any, *, name: str, version: str, schema: ModelSchema, classes: Any,
                 batched: bool = False) -> None:
        self.mlserver_app = mlserver_app
        # One retry at a time: failed requests retried together would share a batch, and fail together, again.
        self.retry_alone = asyncio.Lock() if batched else None
        self.name = name
        self.version = version
        self.schema = schema
        # MLServer's scikit-learn runtime answers one column per row.
        self.metadata = model_metadata(name, version, schema, classes, [-1, 1])
        self.readiness = Readiness(self._test_prediction)

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.mlserver_app(scope, receive, send)
            return
        path = scope["path"]
        match = MODEL_PATH.match(path)
        ours = match is not None and match["name"] == self.name and match["version"] in (None, self.version)
        action = match["action"] if ours and match is not None else None
        if path == "/v2":
            await respond(send, 200, SERVER_METADATA, [JSON_CONTENT])
        elif path == "/v2/health/ready" or (ours and action == "/ready"):
            await self._ready(scope, receive, send)
        elif ours and action == "/infer" and scope["method"] == "POST":
            await self._infer(scope, receive, send)
        elif ours and action is None and scope["method"] == "GET":
            await respond(send, 200, self.metadata, [JSON_CONTENT])
        elif path == "/v2/health/live" or match is not None:
            # Liveness, another model or version (MLServer's 404 names it), a wrong method (its 405).
            await self.mlserver_app(scope, receive, send)
        else:
            await respond(send, 404, error_body(f"no route {path}"), [JSON_CONTENT])

    async def _ready(self, scope: dict, receive: Receive, send: Send) -> None:
        status, headers, body = await self._mlserver(scope, b"", receive)
        if status == 200 and not await self.readiness.ready():
            status, headers, body = 503, [JSON_CONTENT], error_body(
                f"model {self.name} v{self.version} failed its test prediction")
        await respond(send, status, body, headers)

    async def _test_prediction(self) -> None:
        request = InferRequest(id=None, input_name="input-0", features=np.zeros((1, self.schema.n_features)))
        scope: dict[str, Any] = {"type": "http", "http_version": "1.1", "method": "POST", "scheme": "http", "root_path": "",
                 "path": f"/v2/models/{self.name}/infer", "raw_path": f"/v2/models/{self.name}/infer".encode(),
                 "query_string": b"", "headers": [], "client": None, "server": None}
        status, _, body = await self._mlserver(scope, json_infer_request(request), _no_more_messages)
        if status != 200:
            raise RuntimeError(f"MLServer answered {status}: {body[:300].decode(errors='replace')}")

    async def _infer(self, scope: dict, receive: Receive, send: Send) -> None:
        try:
            body = await read_body(scope, receive)
            request = decode_infer_request(body, json_length(scope["headers"]), self.schema)
        except BadRequest as error:
            await respond(send, error.status, error_body(str(error)), [JSON_CONTENT])
            return
        # MLServer's scikit-learn runtime reads one tensor: binary and columnar requests reach it as one.
        as_json = body if request.json_tensor else json_infer_request(request)
        status, headers, answer = await self._mlserver(scope, as_json, receive)
        if status == 500 and self.retry_alone is not None:
            async with self.retry_alone:
                status, headers, answer = await self._mlserver(scope, as_json, receive)
        if status == 200:
            self.readiness.record_success()
            if request.binary_default or any(request.binary_by_output.values()):
                answer, headers = binary_outputs(answer, request)
        elif status == 500 and not await self.readiness.model_at_fault():
            status, headers = 422, [JSON_CONTENT]
            answer = error_body(f"model {self.name} v{self.version} cannot predict these inputs (it predicts "
                                f"others): {orjson.loads(answer)['error']}")
        await respond(send, status, answer, headers)

    async def _mlserver(self, scope: dict, body: bytes, receive: Receive) -> tuple[int, list, bytes]:
        """MLServer's answer to `scope` with `body` as JSON, captured (its content-length is recomputed); for an
        exception of the model, a 500 with a V2 error body naming it."""
        headers = [(key, value) for key, value in scope["headers"] if key.lower() not in REWRITTEN_HEADERS]
        if body:
            headers += [JSON_CONTENT, (b"content-length", str(len(body)).encode())]
        sent: list[dict] = []
        delivered = False

        async def receive_body() -> dict:
            nonlocal delivered
            if delivered:  # after the body, only the client's disconnect is news
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def capture(message: dict) -> None:
            sent.append(message)

        try:
            await self.mlserver_app({**scope, "headers": headers}, receive_body, capture)
        except Exception as error:  # the model's: Starlette answers a bare 500 for it, then raises it on
            return 500, [JSON_CONTENT], error_body(f"{type(error).__name__}: {error}")
        start = sent[0]
        answer = b"".join(message.get("body", b"") for message in sent[1:])
        return start["status"], [(key, value) for key, value in start["headers"] if key.lower() != b"content-length"], answer


def binary_outputs(answer: bytes, request: InferRequest) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """MLServer's JSON infer response with the outputs `request` wants binary re-encoded that way."""
    response = orjson.loads(answer)
    outputs = []
    for output in response.pop("outputs"):
        dtype = FIXED_SIZE_DATATYPES.get(output["datatype"], object)
        outputs.append((output["name"], output["datatype"], np.asarray(output["data"], dtype=dtype).reshape(output["shape"])))
    return encode_infer_response(response, outputs, request)


async def _no_more_messages() -> dict:
    return {"type": "http.disconnect"}
