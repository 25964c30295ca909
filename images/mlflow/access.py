"""Who may change what in the stage's MLflow: the authorization function of its basic-auth app (auth.ini).

MLflow's basic-auth app checks grants on existing experiments and models, but lets every logged-in user
create new ones (experiments, runs in them, registered models, prompts, webhooks, AI-gateway secrets...),
and lets whoever created a model delete it. So this function, which MLflow calls on every request before its
own checks, first authenticates with MLflow's own basic auth (401 unless a known user with the right
password) and then refuses, with 403, what the identity's role never needs:

- `reader` (serving replicas), and any user an administrator adds: reads only. A write is any request but
  GET/HEAD/OPTIONS, except the POSTs by which MLflow's API reads (`.../search`, `.../get-...`), so an
  endpoint a future MLflow adds is refused to readers until it is known to read.
- `trainer` (`mlops train`) and `promoter` (`mlops promote`): exactly what logging a run and registering
  its model as a new version takes (WRITER_ENDPOINTS), nothing else, so neither can delete, rename,
  re-stage or re-alias anything, nor change users, roles or grants, their own password included.
- Models are write-once for everyone but the administrator: a file already in the artifact store is never
  uploaded over, and a run's or a model version's `sha256`, `manifest_sha256` and `signature` tags, once set,
  never change (setting the same value again is a retry). A writer may still set one a version lacks: `mlops
  train` signs the version after the run registered it. Replicas load a version only if a key their stage
  trusts signed those hashes and the files hash to them, so a writer's password can neither swap the files of
  a version a stage serves nor re-sign it; what it can register unsigned, no replica loads.
- A model version's signature must verify with one of the keys the stage's replicas trust (MODEL_SIGNING_KEYS,
  public keys), so a writer's password cannot sign a fresh version first with a key of its own, which the
  write-once rule would then keep and every replica refuse. Without keys (a stage that serves nothing) the
  tag is only write-once.
- Users, roles and grants are an administrator's alone, reading them included.
- MLflow's administrators: everything (nothing of the stack logs in as one).

MLflow 3.17 also answers `/mlflow/server-info` to anyone, before any authorization function runs; the
stack's contract is that `/health` is the one path open without credentials, so `create_app` puts
server-info behind a login too.

What is not refused here is then checked by MLflow's grants (start.py: READ by default, EDIT for writers).
"""
from __future__ import annotations

import base64
import binascii
import os
import posixpath
import re

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from fastapi import FastAPI
from flask import Response, g, request
from mlflow.server import auth
from mlflow.server.auth import authenticate_request_basic_auth, make_forbidden_response, store
from mlflow.server.handlers import _get_artifact_repo_mlflow_artifacts, _get_model_registry_store, _get_tracking_store
from starlette.responses import PlainTextResponse
from start import WRITERS
from werkzeug.datastructures import Authorization

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# MLflow reads with POST where a query does not fit in a URL: runs/search, experiments/search,
# registered-models/get-latest-versions, traces/search, experiments/search-datasets...
READ_BY_POST_PREFIXES = ("search", "get")
# `/api/2.0/mlflow/runs/set-tag` -> `runs/set-tag`; the UI's /ajax-api/ paths and API 3.0 alike.
API_ENDPOINT = re.compile(r"^/(?:ajax-)?api/\d+\.\d+/mlflow/(?P<endpoint>.+?)/?$")
ARTIFACT_UPLOAD = re.compile(r"^/(?:ajax-)?api/2\.0/mlflow-artifacts/artifacts/(?P<path>.+)$")
# What mlops_training/registry.py (through MLflow's client) and mlops/modelstore.py send to log a run and
# register its model; artifact uploads are the other write a writer makes.
WRITER_ENDPOINTS = frozenset({
    "experiments/create", "runs/create", "runs/update", "runs/log-batch", "runs/log-metric", "runs/log-parameter",
    "runs/set-tag", "registered-models/create", "model-versions/create", "model-versions/set-tag",
})
ADMINISTERED = ("/mlflow/users/", "/mlflow/roles/", "/permissions/")
SERVER_INFO = "/mlflow/server-info"
# Copies of mlops_spec.contract's (tests/test_contract.py checks them): the model's, the manifest's sha256, the
# signature; the variable the trusted keys come in; the signed message.
WRITE_ONCE_TAGS = ("sha256", "manifest_sha256", "signature")
MODEL_HASH_TAG, MANIFEST_HASH_TAG, SIGNATURE_TAG = WRITE_ONCE_TAGS
TRUSTED_KEYS_VARIABLE = "MODEL_SIGNING_KEYS"
PEM_PUBLIC_KEY = re.compile(r"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.DOTALL)
VERSION_TAGGING = ("model-versions/create", "model-versions/set-tag")


def signed_message(model: str, model_sha256: str, manifest_sha256: str) -> bytes:
    return f"mlops-model-v1\n{model}\n{model_sha256}\n{manifest_sha256}\n".encode()


def trusted_keys(pem_text: str) -> list[Ed25519PublicKey]:
    """The Ed25519 public keys of `pem_text`, one PEM block each (the program checked them: a bad one is a
    server that does not start, not one that trusts less)."""
    keys = []
    for block in PEM_PUBLIC_KEY.findall(pem_text):
        try:
            key = load_pem_public_key(block.encode())
        except ValueError:
            key = None
        if not isinstance(key, Ed25519PublicKey):
            raise SystemExit(f"error: {TRUSTED_KEYS_VARIABLE} holds a PEM block that is no Ed25519 public key")
        keys.append(key)
    return keys


TRUSTED_KEYS = trusted_keys(os.environ.get(TRUSTED_KEYS_VARIABLE, ""))


def _endpoint(path: str) -> str:
    match = API_ENDPOINT.match(path)
    return match["endpoint"] if match else ""


def is_read(method: str, path: str) -> bool:
    return method in READ_METHODS or (method == "POST" and
                                      _endpoint(path).rsplit("/", 1)[-1].startswith(READ_BY_POST_PREFIXES))


def administers(path: str) -> bool:
    return any(part in path for part in ADMINISTERED)


def writer_may(method: str, path: str, body: dict) -> bool:
    """Whether a writer may send this write: an upload of a new file, or an endpoint of WRITER_ENDPOINTS that
    renames nothing (a run's name is metadata, not logging)."""
    if method == "PUT" and ARTIFACT_UPLOAD.match(path):
        return True
    endpoint = _endpoint(path)
    return method == "POST" and endpoint in WRITER_ENDPOINTS and not (endpoint == "runs/update" and "run_name" in body)


def overwrites_artifact(method: str, path: str) -> bool:
    if method != "PUT" or not (upload := ARTIFACT_UPLOAD.match(path)):
        return False
    artifact = posixpath.normpath(upload["path"])
    folder = posixpath.dirname(artifact)
    return any(existing.path == artifact for existing in _get_artifact_repo_mlflow_artifacts().list_artifacts(folder or None))


def _tags_set(endpoint: str, body: dict) -> dict[str, str]:
    if endpoint in ("runs/set-tag", "model-versions/set-tag"):
        return {str(body.get("key")): str(body.get("value"))}
    if endpoint in ("runs/log-batch", "runs/create", "model-versions/create"):
        return {str(tag.get("key")): str(tag.get("value")) for tag in body.get("tags") or () if isinstance(tag, dict)}
    return {}


def _current_tags(endpoint: str, body: dict) -> dict[str, str]:
    """The tags of the run or model version `body` names; none when it names none that exists (MLflow then
    answers the request with its own error)."""
    try:
        if endpoint.startswith("runs/"):
            return _get_tracking_store().get_run(str(body.get("run_id") or body.get("run_uuid"))).data.tags
        return _get_model_registry_store().get_model_version(str(body.get("name")), str(body.get("version"))).tags
    except Exception:  # noqa: BLE001 - whatever MLflow raises for a missing run or version
        return {}


def moves_write_once_tag(method: str, path: str, body: dict) -> bool:
    """Whether the request changes one of WRITE_ONCE_TAGS that is already set (setting the same value again is a
    retry, not a change)."""
    endpoint = _endpoint(path)
    wanted = {tag: value for tag, value in _tags_set(endpoint, body).items() if tag in WRITE_ONCE_TAGS}
    if method != "POST" or not wanted:
        return False
    current = _current_tags(endpoint, body)
    return any(current.get(tag, value) != value for tag, value in wanted.items())


def signs_untrusted(method: str, path: str, body: dict, trusted: list[Ed25519PublicKey]) -> bool:
    """Whether the request gives a model version a signature that none of `trusted` made of the version's name
    and hashes (a version created with its tags names them in the request; one tagged later, in MLflow)."""
    endpoint = _endpoint(path)
    wanted = _tags_set(endpoint, body)
    signature = wanted.get(SIGNATURE_TAG)
    if method != "POST" or endpoint not in VERSION_TAGGING or signature is None or not trusted:
        return False
    tags = {**(_current_tags(endpoint, body) if endpoint == "model-versions/set-tag" else {}), **wanted}
    try:
        raw = base64.b64decode(signature, validate=True)
    except binascii.Error:
        return True
    message = signed_message(str(body.get("name")), tags.get(MODEL_HASH_TAG, ""), tags.get(MANIFEST_HASH_TAG, ""))
    return not any(_verifies(key, raw, message) for key in trusted)


def _verifies(key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


def may(username: str, method: str, path: str, body: dict) -> bool:
    """Whether `username`'s role allows `method path` with `body` at all (MLflow's grants still apply afterwards)."""
    if store.get_user(username).is_admin:
        return True
    if administers(path):
        return False
    if is_read(method, path):
        return True
    return (username in WRITERS and writer_may(method, path, body)
            and not overwrites_artifact(method, path) and not moves_write_once_tag(method, path, body)
            and not signs_untrusted(method, path, body, TRUSTED_KEYS))


def _decide() -> Authorization | Response:
    authorization = authenticate_request_basic_auth()
    if not isinstance(authorization, Authorization):
        return authorization
    body = request.get_json(silent=True) if request.method == "POST" else None
    if not may(authorization.username, request.method, request.path, body if isinstance(body, dict) else {}):
        return make_forbidden_response()
    return authorization


def authenticate_and_authorize() -> Authorization | Response:
    """MLflow calls this again from its own validators and after-request hooks of the same request; the decision
    is made once, before the request changed anything (after an upload, its file exists)."""
    if "mlops_authorization" not in g:
        g.mlops_authorization = _decide()
    return g.mlops_authorization


def create_app() -> FastAPI:
    """The app of `mlflow server --app-name mlops-basic-auth` (start.py; the entry point is declared in
    mlops_mlflow_app-1.dist-info beside this module): MLflow's basic-auth app, with server-info behind a login."""
    app = auth.create_app()

    @app.middleware("http")
    async def server_info_needs_a_login(request, call_next):  # noqa: ANN001, ANN202 - Starlette's middleware hook
        if request.url.path.endswith(SERVER_INFO):
            credentials = Authorization.from_header(request.headers.get("Authorization"))
            if credentials is None or not store.authenticate_user(credentials.username or "", credentials.password or ""):
                return PlainTextResponse("You are not authenticated.", status_code=401,
                                         headers={"WWW-Authenticate": 'Basic realm="mlflow"'})
        return await call_next(request)

    return app
