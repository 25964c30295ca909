"""Start MLflow with its basic-auth app, after making sure the stage's identities exist with their permissions.

Each identity's password derives from the stage's MLflow secret (`mlops_spec.contract.derived_password`), where
the identities log in. This container gets neither: MLOPS_MLFLOW_PASSWORD_HASHES holds `identity:hash` lines,
each password as MLflow's auth store keeps it (components/model_registry.py makes them), for:

- `admin` is MLflow's administrator, which the server needs and nothing of the stack logs in as;
- `reader` is what serving replicas fetch models as: MLflow's default permission (READ, auth.ini) and
  nothing more, so it can read every model; access.py refuses it every write, creating included;
- `trainer` (`mlops train`) and `promoter` (`mlops promote`) may edit every experiment and registered
  model, including those the other one, an earlier release of this stack without authentication, or
  another identity created: EDIT can create runs, upload artifacts, register versions and set tags;
  access.py refuses them deleting, renaming, re-staging and aliasing anything, even what they created.

Users and grants go straight into the auth database before the server starts, so the server never
answers anyone before the identities exist. Running it again changes nothing, except that every password
hash is set to the one handed over, which is how the secret is rotated.

Where the stack publishes MLflow off loopback, it hands over a certificate and key, and the server speaks TLS
(mlops_spec/service_tls.py).

Usage: start.py MLFLOW-SERVER-ARGUMENTS... (the CMD of the image passes them).
"""
from __future__ import annotations

import os
import secrets
import sys

ADMIN = "admin"
IDENTITIES = ("reader", "trainer", "promoter")
WRITERS = ("trainer", "promoter")
WRITTEN_RESOURCES = ("experiment", "registered_model")
WRITE_PERMISSION = "EDIT"
HASHES_VARIABLE = "MLOPS_MLFLOW_PASSWORD_HASHES"
TLS_CERTIFICATE_VARIABLE = "MLOPS_TLS_CERTIFICATE"
TLS_KEY_VARIABLE = "MLOPS_TLS_KEY"
TLS_FOLDER = "/tmp/tls"


def password_hashes() -> dict[str, str]:
    """Each identity's password hash: from the file `<HASHES_VARIABLE>_FILE` names (a Swarm secret under
    /run/secrets), else from the variable itself (one Docker host); either way they leave the environment."""
    file = os.environ.pop(f"{HASHES_VARIABLE}_FILE", "")
    text = os.environ.pop(HASHES_VARIABLE, "")
    if file:
        with open(file, encoding="utf-8") as handle:
            text = handle.read()
    hashes = dict(line.split(":", 1) for line in text.split() if ":" in line)
    if missing := [identity for identity in (ADMIN, *IDENTITIES) if not hashes.get(identity)]:
        sys.exit(f"error: {HASHES_VARIABLE} (or {HASHES_VARIABLE}_FILE) has no password hash for "
                 f"{', '.join(missing)}: the stack derives them from its Pulumi config mlops:mlflowPassword")
    return hashes


def ensure_identities(hashes: dict[str, str]) -> None:
    # Imported here: the tests import this module where MLflow is not installed.
    from mlflow.server.auth.config import read_auth_config
    from mlflow.server.auth.db.models import SqlUser
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    config = read_auth_config()
    store = SqlAlchemyStore()
    store.init_db(config.database_uri)
    for identity in (ADMIN, *IDENTITIES):
        if not store.has_user(identity, use_primary=True):
            # The store creates a user only from a password; its hash is replaced below before anyone can log in.
            store.create_user(identity, secrets.token_hex(32), is_admin=identity == ADMIN)
        with store.ManagedSessionMaker(read_only=False) as session:
            session.query(SqlUser).filter(SqlUser.username == identity).one().password_hash = hashes[identity]
    for identity in WRITERS:
        for resource in WRITTEN_RESOURCES:
            store.grant_user_permission(identity, resource, "*", WRITE_PERMISSION)


def tls_arguments() -> list[str]:
    """uvicorn's options to speak TLS with the certificate and key the stack made (TLS_CERTIFICATE_VARIABLE, and
    TLS_KEY_VARIABLE or its _FILE), written where only this user reads them; none: plain HTTP. The key leaves
    the environment."""
    certificate = os.environ.pop(TLS_CERTIFICATE_VARIABLE, "")
    key = os.environ.pop(TLS_KEY_VARIABLE, "")
    if key_file := os.environ.pop(f"{TLS_KEY_VARIABLE}_FILE", ""):
        with open(key_file, encoding="utf-8") as handle:
            key = handle.read()
    if not certificate and not key:
        return []
    if not (certificate and key):
        sys.exit(f"error: {TLS_CERTIFICATE_VARIABLE} and {TLS_KEY_VARIABLE} (or {TLS_KEY_VARIABLE}_FILE) go together: "
                 "the stack sets both where MLflow's port is published off loopback")
    os.makedirs(TLS_FOLDER, mode=0o700, exist_ok=True)
    paths = {}
    for name, pem in (("certificate", certificate), ("key", key)):
        paths[name] = os.path.join(TLS_FOLDER, f"{name}.pem")
        with os.fdopen(os.open(paths[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
            out.write(pem)
    return ["--uvicorn-opts", f"--ssl-certfile {paths['certificate']} --ssl-keyfile {paths['key']}"]


def main(server_arguments: list[str]) -> None:
    tls = tls_arguments()
    ensure_identities(password_hashes())
    # The admin exists by now, so the server needs no admin password. The Flask key is new at every start and
    # inherited by every worker, so the UI's CSRF tokens verify in all of them and it derives from nothing.
    os.environ["MLFLOW_FLASK_SERVER_SECRET_KEY"] = secrets.token_hex(32)
    if published_host := os.environ.get("MLOPS_PUBLISHED_HOST"):
        os.environ["MLFLOW_SERVER_ALLOWED_HOSTS"] += f",{published_host}"
    # MLflow's basic-auth app as access.py completes it (the entry point of mlops_mlflow_app-1.dist-info).
    os.execvp("mlflow", ["mlflow", "server", "--app-name", "mlops-basic-auth", *server_arguments, *tls])


if __name__ == "__main__":
    main(sys.argv[1:])
