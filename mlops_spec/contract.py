"""Names that the Pulumi components, the `mlops` commands and the images must agree on, said once.

The images are built without this package, so they keep copies of what they read (images/mlflow/start.py
derives the same passwords, images/gateway/gateway.py reads the same GATEWAY_MODELS);
tests/test_contract.py checks that those copies equal what is here.

Passwords: each stack holds two Pulumi config secrets, `mlops:registryPassword` (its image registry) and
`mlops:mlflowPassword`, from which the password of each MLflow identity is derived as the HMAC-SHA256 of the
identity's name under the secret, in hex. Users keep one secret per stack and no identity's password is stored.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from typing import Optional, Sequence

from mlops_spec.models import CanaryRelease, ModelPin, TrafficSplit

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
"""Where the gateway records each model's rollout, events and state in `ROLLOUT_DIR/<model>/`, on the stage's
rollout volume."""
GATEWAY_MODELS = "GATEWAY_MODELS"
"""The gateway's variable listing, as JSON, each model it routes: name, blue and green replicas, weights and
green's rollout."""


def rollout_folder(model: str) -> str:
    """Where the gateway records `model`'s rollout (images/gateway/canary.py)."""
    return f"{ROLLOUT_DIR}/{model}"


def derived_password(secret: str, identity: str) -> str:
    return hmac.new(secret.encode(), identity.encode(), hashlib.sha256).hexdigest()


def secret_variable(key: str, stage: str) -> str:
    """`registryPassword`, `staging` -> `MLOPS_REGISTRY_PASSWORD_STAGING`: where CI hands a stage's secret over."""
    words = re.sub(r"(?<!^)(?=[A-Z])", "_", key).upper()
    return f"MLOPS_{words}_{stage.upper().replace('-', '_')}"


def release_id(pin: ModelPin) -> str:
    """Which green a rollout belongs to: a rolled-back green is never rolled out again, a new one is."""
    return f"{pin.name}:{pin.version}:{pin.sha256 or ''}"


@dataclass(frozen=True)
class GatewayRoute:
    """One model as the gateway routes it: `/v2/models/<name>/...` to its pools by its weights."""

    name: str
    blue: Sequence[str]
    """`host:port` of each blue replica (on a swarm `tasks.<service>:port`, every task of the service)."""
    green: Sequence[str]
    traffic: TrafficSplit
    canary: Optional[CanaryRelease] = None
    """The green slot, whose `rollout` the gateway runs when it has one."""


def gateway_env(models: Sequence[GatewayRoute], prometheus_url: str | None, scrape_interval_s: int | None) -> dict[str, str]:
    """What the gateway needs (images/gateway/gateway.py reads it): GATEWAY_MODELS, and with a rollout where to
    judge it (`prometheus_url`, which a rollout requires) and where to record it."""
    declared, rollouts = [], False
    for model in models:
        entry: dict[str, object] = {"name": model.name, "blue": list(model.blue), "green": list(model.green),
                                    "weights": {"blue": model.traffic.blue, "green": model.traffic.green}}
        if model.canary is not None and model.canary.rollout is not None:
            entry["rollout"] = {"policy": model.canary.rollout.model_dump(), "green_release": release_id(model.canary.model)}
            rollouts = True
        declared.append(entry)
    env = {GATEWAY_MODELS: json.dumps(declared)}
    if rollouts:
        assert prometheus_url is not None and scrape_interval_s is not None, "a rollout is judged by Prometheus"
        env |= {"PROMETHEUS_URL": prometheus_url, "SCRAPE_INTERVAL_S": str(scrape_interval_s), "ROLLOUT_DIR": ROLLOUT_DIR}
    return env
