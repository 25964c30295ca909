"""Names that the Pulumi components, the `mlops` commands and the images must agree on, said once.

The images are built without this package, so they keep copies of what they read (images/mlflow/start.py
derives the same passwords, images/gateway/canary.py reads the same rollout variables);
tests/test_contract.py checks that those copies equal what is here.

Passwords: each stack holds two Pulumi config secrets, `mlops:registryPassword` (its image registry) and
`mlops:mlflowPassword`, from which the password of each MLflow identity is derived as the HMAC-SHA256 of the
identity's name under the secret, in hex. Users keep one secret per stack and no identity's password is stored.
"""
from __future__ import annotations

import hashlib
import hmac
import re

from mlops_spec.models import CanaryRelease, ModelPin

ADMIN = "admin"
"""MLflow's administrator: creates the other identities when the server starts; never used by the stack."""
READER = "reader"
"""Serving replicas: reads only."""
TRAINER = "trainer"
"""`mlops train`: creates runs and model versions."""
PROMOTER = "promoter"
"""`mlops promote`: reads the source stage, writes into the target stage."""
IDENTITIES = (READER, TRAINER, PROMOTER)
"""The identities the stack logs in as; the MLflow image creates each with its derived password."""

REGISTRY_PASSWORD = "registryPassword"
MLFLOW_PASSWORD = "mlflowPassword"
"""The stack's config secrets, `mlops:<key>`."""

ROLLOUT_DIR = "/data/rollout"
"""Where the gateway records a rollout's events and state, on the stage's rollout volume."""


def derived_password(secret: str, identity: str) -> str:
    return hmac.new(secret.encode(), identity.encode(), hashlib.sha256).hexdigest()


def secret_variable(key: str, stage: str) -> str:
    """`registryPassword`, `staging` -> `MLOPS_REGISTRY_PASSWORD_STAGING`: where CI hands a stage's secret over."""
    words = re.sub(r"(?<!^)(?=[A-Z])", "_", key).upper()
    return f"MLOPS_{words}_{stage.upper().replace('-', '_')}"


def release_id(pin: ModelPin) -> str:
    """Which green a rollout belongs to: a rolled-back green is never rolled out again, a new one is."""
    return f"{pin.name}:{pin.version}:{pin.sha256 or ''}"


def gateway_env(green: CanaryRelease, prometheus_url: str, scrape_interval_s: int) -> dict[str, str]:
    """What the gateway needs to run green's rollout: the policy, where to judge it and where to record it."""
    assert green.rollout is not None
    return {"ROLLOUT_POLICY": green.rollout.model_dump_json(), "PROMETHEUS_URL": prometheus_url,
            "SCRAPE_INTERVAL_S": str(scrape_interval_s), "ROLLOUT_DIR": ROLLOUT_DIR,
            "GREEN_RELEASE": release_id(green.model)}
