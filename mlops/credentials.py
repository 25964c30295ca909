"""A stage's secrets as the commands that act on a stage from outside Pulumi (`mlops promote`, `mlops train`)
read them, and the MLflow identities' passwords derived from the one MLflow secret.

Each stack holds two Pulumi config secrets: `mlops:registryPassword` (its image registry) and
`mlops:mlflowPassword`, from which the password of each MLflow identity is derived as the HMAC-SHA256 of the
identity's name under the secret, in hex. The Pulumi program, the MLflow image's start script
(images/mlflow/start.py, which creates the users) and these commands derive the same passwords, so users
keep one secret per stack and no identity's password is stored anywhere.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import re
import subprocess

READER = "reader"
"""Serving replicas: reads only."""
TRAINER = "trainer"
"""`mlops train`: creates runs and model versions."""
PROMOTER = "promoter"
"""`mlops promote`: reads the source stage, writes into the target stage."""
REGISTRY_PASSWORD = "registryPassword"
MLFLOW_PASSWORD = "mlflowPassword"


class MissingSecret(Exception):
    """Neither the environment nor the Pulumi CLI gave the secret; the message says how to provide it."""


def derived_password(secret: str, identity: str) -> str:
    return hmac.new(secret.encode(), identity.encode(), hashlib.sha256).hexdigest()


def secret_variable(key: str, stage: str) -> str:
    """`registryPassword`, `staging` -> `MLOPS_REGISTRY_PASSWORD_STAGING`."""
    words = re.sub(r"(?<!^)(?=[A-Z])", "_", key).upper()
    return f"MLOPS_{words}_{stage.upper().replace('-', '_')}"


def stack_secret(stage: str, key: str, purpose: str) -> str:
    """Stack `stage`'s config secret `mlops:<key>`: from its `MLOPS_…_<STAGE>` variable where CI provides it,
    else through the Pulumi CLI. Never printed; `purpose` names it in the error, e.g. "staging's image registry"."""
    variable = secret_variable(key, stage)
    if os.environ.get(variable):
        return os.environ[variable]
    try:
        read = subprocess.run(["pulumi", "config", "get", f"mlops:{key}", "--stack", stage],
                              capture_output=True, text=True, timeout=60)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        read = None
    if read is None or read.returncode != 0 or not read.stdout.strip():
        raise MissingSecret(f"no password for {purpose}: set {variable}, or run where the Pulumi CLI reads "
                            f"stack {stage}'s secret mlops:{key}")
    return read.stdout.strip()


def registry_password(stage: str) -> str:
    return stack_secret(stage, REGISTRY_PASSWORD, f"{stage}'s image registry")


def mlflow_password(stage: str, identity: str) -> str:
    """The password `identity` logs in to `stage`'s MLflow with."""
    return derived_password(stack_secret(stage, MLFLOW_PASSWORD, f"{stage}'s MLflow"), identity)
