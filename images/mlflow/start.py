"""Start MLflow with its basic-auth app, after making sure the stage's identities exist with their permissions.

The stage's one MLflow secret arrives as MLOPS_MLFLOW_PASSWORD; each identity's password is derived from it
(HMAC-SHA256 of the identity's name under the secret, hex), exactly as `mlops_spec.contract.derived_password`
derives it where the identities log in, so nothing but the one secret has to be stored or handed around:

- `admin` is MLflow's administrator, which the server needs and nothing of the stack logs in as;
- `reader` is what serving replicas fetch models as: MLflow's default permission (READ, auth.ini) and
  nothing more, so it can read every model; access.py refuses it every write, creating included;
- `trainer` (`mlops train`) and `promoter` (`mlops promote`) may edit every experiment and registered
  model, including those the other one, an earlier release of this stack without authentication, or
  another identity created: EDIT can create runs, upload artifacts, register versions and set tags;
  access.py refuses them deleting, renaming, re-staging and aliasing anything, even what they created.

Users and grants go straight into the auth database before the server starts, so the server never
answers anyone before the identities exist. Running it again changes nothing, except that every password
is set to what the current secret derives, which is how the secret is rotated.

Usage: start.py MLFLOW-SERVER-ARGUMENTS... (the CMD of the image passes them).
"""
from __future__ import annotations

import hashlib
import hmac
import os
import sys

ADMIN = "admin"
IDENTITIES = ("reader", "trainer", "promoter")
WRITERS = ("trainer", "promoter")
WRITTEN_RESOURCES = ("experiment", "registered_model")
WRITE_PERMISSION = "EDIT"
SECRET_VARIABLE = "MLOPS_MLFLOW_PASSWORD"
FLASK_SECRET_KEY_PURPOSE = "flask-secret-key"


def derived_password(secret: str, identity: str) -> str:
    return hmac.new(secret.encode(), identity.encode(), hashlib.sha256).hexdigest()


def ensure_identities(secret: str) -> None:
    # Imported here: `derived_password` is also imported by the tests, where MLflow is not installed.
    from mlflow.server.auth.config import read_auth_config
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    config = read_auth_config()
    store = SqlAlchemyStore()
    store.init_db(config.database_uri)
    for identity in (ADMIN, *IDENTITIES):
        password = derived_password(secret, identity)
        if not store.has_user(identity, use_primary=True):
            store.create_user(identity, password, is_admin=identity == ADMIN)
        elif not store.authenticate_user(identity, password, use_primary=True):
            store.update_user(identity, password=password)
    for identity in WRITERS:
        for resource in WRITTEN_RESOURCES:
            store.grant_user_permission(identity, resource, "*", WRITE_PERMISSION)


def stage_secret() -> str:
    """The stage's MLflow secret: from the file `<SECRET_VARIABLE>_FILE` names (a Swarm secret under
    /run/secrets), else from the variable itself (one Docker host); either way it leaves the environment."""
    file = os.environ.pop(f"{SECRET_VARIABLE}_FILE", "")
    secret = os.environ.pop(SECRET_VARIABLE, "")
    if file:
        with open(file, encoding="utf-8") as handle:
            return handle.read().strip()
    return secret


def main(server_arguments: list[str]) -> None:
    secret = stage_secret()
    if not secret:
        sys.exit(f"error: set {SECRET_VARIABLE} (or {SECRET_VARIABLE}_FILE) to the stage's MLflow secret "
                 "(Pulumi config mlops:mlflowPassword)")
    ensure_identities(secret)
    os.environ.update({
        # CSRF tokens of the UI's sign-up form must verify in every worker, so the key is fixed per stage.
        "MLFLOW_FLASK_SERVER_SECRET_KEY": derived_password(secret, FLASK_SECRET_KEY_PURPOSE),
        "MLFLOW_AUTH_ADMIN_PASSWORD": derived_password(secret, ADMIN),
    })
    if published_host := os.environ.get("MLOPS_PUBLISHED_HOST"):
        os.environ["MLFLOW_SERVER_ALLOWED_HOSTS"] += f",{published_host}"
    # MLflow's basic-auth app as access.py completes it (the entry point of mlops_mlflow_app-1.dist-info).
    os.execvp("mlflow", ["mlflow", "server", "--app-name", "mlops-basic-auth", *server_arguments])


if __name__ == "__main__":
    main(sys.argv[1:])
