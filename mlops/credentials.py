"""A stage's secrets as the commands that act on a stage from outside Pulumi (`mlops promote`, `mlops train`)
read them: from CI's `MLOPS_<SECRET>_<STAGE>` variable, else through the Pulumi CLI. How MLflow passwords derive
from the one MLflow secret is `mlops_spec.contract`'s."""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from typing import Optional

from mlops_spec.contract import (
    MLFLOW_PASSWORD,
    MODEL_SIGNING_KEY,
    REGISTRY_PASSWORD,
    TRUSTED_MODEL_KEYS,
    derived_password,
    secret_variable,
)
from mlops_spec.models import StageSpec
from mlops_spec.service_tls import client_ca


class MissingSecret(Exception):
    """Neither the environment nor the Pulumi CLI gave the secret; the message says how to provide it."""


def _stack_config(stage: str, key: str) -> str:
    """Stack `stage`'s config `mlops:<key>`: from its `MLOPS_…_<STAGE>` variable where CI provides it, else through
    the Pulumi CLI; empty when neither has it."""
    variable = secret_variable(key, stage)
    if os.environ.get(variable):
        return os.environ[variable]
    try:
        read = subprocess.run(["pulumi", "config", "get", f"mlops:{key}", "--stack", stage],
                              capture_output=True, text=True, timeout=60)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return ""
    return read.stdout.strip() if read.returncode == 0 else ""


def stack_secret(stage: str, key: str, purpose: str) -> str:
    """Stack `stage`'s config secret `mlops:<key>`. Never printed; `purpose` names it in the error, e.g.
    "staging's image registry"."""
    if not (value := _stack_config(stage, key)):
        raise MissingSecret(f"no password for {purpose}: set {secret_variable(key, stage)}, or run where the Pulumi "
                            f"CLI reads stack {stage}'s secret mlops:{key}")
    return value


def registry_password(stage: str) -> str:
    return stack_secret(stage, REGISTRY_PASSWORD, f"{stage}'s image registry")


@dataclass(frozen=True)
class MlflowLogin:
    password: str
    """The password the identity logs in with."""
    ca_certificate: Optional[str]
    """PEM of the CA the stage's MLflow verifies with where it speaks TLS (published off loopback), else None."""


def mlflow_login(spec: StageSpec, identity: str) -> MlflowLogin:
    """How `identity` logs in to `spec`'s MLflow: both derive from the stage's MLflow secret, read once."""
    secret = stack_secret(spec.stage, MLFLOW_PASSWORD, f"{spec.stage}'s MLflow")
    return MlflowLogin(password=derived_password(secret, identity),
                       ca_certificate=client_ca(spec.model_registry.port, secret, spec.stage, "model-registry"))


def model_signing_key(stage: str) -> str:
    """The private key (PEM) `mlops train` signs `stage`'s new model versions with."""
    if not (value := _stack_config(stage, MODEL_SIGNING_KEY)):
        raise MissingSecret(f"no model signing key for {stage}: set {secret_variable(MODEL_SIGNING_KEY, stage)}, or run "
                            f"where the Pulumi CLI reads stack {stage}'s secret mlops:{MODEL_SIGNING_KEY} (make one with "
                            f"`openssl genpkey -algorithm ed25519 | pulumi config set --secret mlops:{MODEL_SIGNING_KEY} "
                            f"--stack {stage}`)")
    return value


def trusted_model_keys(stage: str) -> str:
    """The public keys (PEM) whose signatures `stage` accepts; not a secret, read the same way."""
    if not (value := _stack_config(stage, TRUSTED_MODEL_KEYS)):
        raise MissingSecret(f"no trusted model keys for {stage}: set {secret_variable(TRUSTED_MODEL_KEYS, stage)}, or "
                            f"run where the Pulumi CLI reads stack {stage}'s config mlops:{TRUSTED_MODEL_KEYS}")
    return value
