"""What the stack reads from a model registry is capped: a registry that answers without end (compromised, or a
proxy gone wrong) fails `mlops promote` and a replica's fetch with one line instead of filling their memory."""
from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator

import pytest

from mlops.modelstore import MlflowStore, StoreError
from mlops_spec.contract import MAX_MLFLOW_ANSWER_BYTES, MAX_MODEL_BYTES
from mlops_spec.project import REPO_ROOT
from tests.model_signing import ModelSigner, manifest_of

sys.path.insert(0, str(REPO_ROOT / "images" / "serving"))
from serving.registry import MlflowRegistry, ModelPin, ModelRefused  # noqa: E402

RUN = {"run": {"info": {"run_id": "r1", "artifact_uri": "mlflow-artifacts:/0/r1/artifacts"}, "data": {}}}
VERSION = {"model_version": {"name": "m", "version": "1", "run_id": "r1", "tags": [{"key": "sha256", "value": "0" * 64}]}}
CHUNK = b"x" * (1024 * 1024)

Answer = Callable[[BaseHTTPRequestHandler], None]


def json_answer(body: dict) -> Answer:
    return bytes_answer(json.dumps(body).encode())


def bytes_answer(payload: bytes) -> Answer:
    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)
    return answer


def declares(length: int) -> Answer:
    """Claims a body of `length` bytes and sends none of it."""
    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(length))
        handler.end_headers()
    return answer


def streams(length: int) -> Answer:
    """Sends `length` bytes without saying how many (the connection's end marks the body's)."""
    def answer(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Connection", "close")
        handler.end_headers()
        sent = 0
        try:
            while sent < length:
                handler.wfile.write(CHUNK[:length - sent])
                sent += len(CHUNK)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the reader stopped at its cap
    return answer


@pytest.fixture
def registry() -> Iterator[Callable[[dict[str, Answer]], str]]:
    """A fake MLflow answering each path (query left out) as told; returns its URL."""
    servers = []

    def start(answers: dict[str, Answer]) -> str:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self) -> None:
                answers[self.path.split("?")[0]](self)

            def log_message(self, *_: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()


ARTIFACT = "/api/2.0/mlflow-artifacts/artifacts/0/r1/artifacts/model/model.pkl"
MANIFEST = "/api/2.0/mlflow-artifacts/artifacts/0/r1/artifacts/model/manifest.json"


@pytest.mark.parametrize("model_answer", [declares(MAX_MODEL_BYTES + 1), declares(2**40)],
                         ids=["one byte too many", "a terabyte"])
def test_promote_refuses_a_model_larger_than_the_cap_before_reading_it(registry, model_answer):
    url = registry({"/api/2.0/mlflow/model-versions/get": json_answer(VERSION),
                    "/api/2.0/mlflow/runs/get": json_answer(RUN), ARTIFACT: model_answer})
    with pytest.raises(StoreError) as refused:
        MlflowStore(url).fetch("m", 1)
    assert str(refused.value) == (f"model registry {url} answered GET {ARTIFACT} with more than 1024 MiB, the most "
                                  "mlops reads from it")


def test_promote_stops_reading_an_endless_answer_at_the_cap(registry):
    url = registry({"/api/2.0/mlflow/model-versions/get": streams(MAX_MLFLOW_ANSWER_BYTES + len(CHUNK))})
    with pytest.raises(StoreError, match="answered GET /api/2.0/mlflow/model-versions/get with more than 64 MiB"):
        MlflowStore(url).fetch("m", 1)


def test_an_answer_within_the_cap_is_read_whole(registry):
    url = registry({"/api/2.0/mlflow/model-versions/get": json_answer(VERSION),
                    "/api/2.0/mlflow/runs/get": json_answer(RUN), ARTIFACT: streams(3 * len(CHUNK)),
                    MANIFEST: json_answer({})})
    assert len(MlflowStore(url).fetch("m", 1).files["model.pkl"]) == 3 * len(CHUNK)


def test_a_replica_refuses_a_model_larger_than_the_cap(registry):
    # Signed, so the replica goes as far as reading the model.
    signer, manifest = ModelSigner(), manifest_of(b"the model")
    tags = [{"key": key, "value": value} for key, value in signer.tags("m", b"the model", manifest).items()]
    url = registry({"/api/2.0/mlflow/model-versions/get": json_answer({"model_version": {**VERSION["model_version"],
                                                                                         "tags": tags}}),
                    "/api/2.0/mlflow/runs/get": json_answer(RUN), ARTIFACT: declares(MAX_MODEL_BYTES + 1),
                    MANIFEST: bytes_answer(manifest)})
    with pytest.raises(ModelRefused) as refused:
        MlflowRegistry(url, trusted=signer.trusted, attempts=1).fetch(ModelPin(name="m", version="1", sha256=""))
    assert str(refused.value) == (f"refusing model m v1: model/model.pkl: {url}{ARTIFACT} answered more than 1024 MiB, "
                                  "the most this replica reads from the model registry")


def test_a_replica_stops_reading_an_endless_answer_at_the_cap(registry):
    url = registry({"/api/2.0/mlflow/model-versions/get": streams(MAX_MLFLOW_ANSWER_BYTES + len(CHUNK))})
    with pytest.raises(ModelRefused, match="model-versions/get answered more than 64 MiB"):
        MlflowRegistry(url, trusted=ModelSigner().trusted, attempts=1).fetch(ModelPin(name="m", version="1", sha256=""))
