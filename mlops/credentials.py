"""A stage's secrets as the commands that act on a stage from outside Pulumi (`mlops promote`, `mlops train`)
read them: from CI's `MLOPS_<SECRET>_<STAGE>` variable, else through the Pulumi CLI. How MLflow passwords derive
from the one MLflow secret is `mlops_spec.contract`'s."""
from __future__ import annotations

import os
import subprocess

from mlops_spec.contract import MLFLOW_PASSWORD, REGISTRY_PASSWORD, derived_password, secret_variable


class MissingSecret(Exception):
    """Neither the environment nor the Pulumi CLI gave the secret; the message says how to provide it."""


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
