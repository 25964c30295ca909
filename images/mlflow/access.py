"""Who may change what in the stage's MLflow: the authorization function of its basic-auth app (auth.ini).

MLflow's basic-auth app checks grants on existing experiments and models, but lets every logged-in user
create new ones (experiments, runs in them, registered models, prompts, webhooks...), and lets whoever
created a model delete it. So this function, which MLflow calls on every request before its own checks,
first authenticates with MLflow's own basic auth (401 unless a known user with the right password) and then
refuses, with 403, what the identity's role never needs:

- `reader` (serving replicas), and any user an administrator adds: reads only. A write is any request but
  GET/HEAD/OPTIONS, except the POSTs by which MLflow's API reads (`.../search`, `.../get-...`), so an
  endpoint a future MLflow adds is refused to readers until it is known to read.
- `trainer` (`mlops train`) and `promoter` (`mlops promote`): add only. They may create and log what a new
  model version needs, and never delete, rename, re-stage or re-alias anything, so neither can take away
  or redirect what a stage serves; nor change users, roles or grants, their own password included.
- MLflow's administrators: everything (nothing of the stack logs in as one).

What is not refused here is then checked by MLflow's grants (start.py: READ by default, EDIT for writers).
"""
from __future__ import annotations

from flask import Response, request
from mlflow.server.auth import authenticate_request_basic_auth, make_forbidden_response, store
from start import WRITERS
from werkzeug.datastructures import Authorization

READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# MLflow reads with POST where a query does not fit in a URL: runs/search, experiments/search,
# registered-models/get-latest-versions, traces/search, experiments/search-datasets...
READ_BY_POST_PREFIXES = ("search", "get")
# The endpoints that take something away or change which version a name leads to.
REMOVING_PREFIXES = ("delete", "rename", "transition-stage", "alias")
# Users, roles and grants: nothing of the stack administers them at run time (start.py does, before the server).
ADMINISTERED = ("/mlflow/users/", "/mlflow/roles/", "/permissions/")
ARTIFACT_PROXY = "/mlflow-artifacts/"


def _action(path: str) -> str:
    """The last segment of an API path, `/api/2.0/mlflow/runs/delete-tag` -> `delete-tag`; none for the artifact
    proxy's paths, which end in file names."""
    return "" if ARTIFACT_PROXY in path else path.rstrip("/").rsplit("/", 1)[-1]


def is_read(method: str, path: str) -> bool:
    return method in READ_METHODS or (method == "POST" and _action(path).startswith(READ_BY_POST_PREFIXES))


def removes(method: str, path: str) -> bool:
    return method == "DELETE" or _action(path).startswith(REMOVING_PREFIXES)


def administers(path: str) -> bool:
    return any(part in path for part in ADMINISTERED)


def may(username: str, method: str, path: str) -> bool:
    """Whether `username`'s role allows `method path` at all (MLflow's grants still apply afterwards)."""
    if is_read(method, path):
        return True
    if username in WRITERS:
        return not removes(method, path) and not administers(path)
    return store.get_user(username).is_admin


def authenticate_and_authorize() -> Authorization | Response:
    authorization = authenticate_request_basic_auth()
    if isinstance(authorization, Authorization) and not may(authorization.username, request.method, request.path):
        return make_forbidden_response()
    return authorization
