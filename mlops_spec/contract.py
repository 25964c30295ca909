"""Names that the Pulumi components, the `mlops` commands and the images must agree on, said once: the
containers' and volumes' names, the ports the images listen on, where volumes are mounted, the environment
variables the components set and the images read, the MLflow identities and how their passwords derive.

The images are built without this package, so they keep copies of what they read (images/mlflow/start.py
derives the same passwords, images/gateway/gateway.py reads the same GATEWAY_MODELS, each image listens on
its port);
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

from mlops_spec.models import ModelPin, RolloutPolicy, TrafficSplit

ADMIN = "admin"
"""MLflow's administrator: creates the other identities when the server starts; never used by the stack."""
READER = "reader"
"""Serving replicas: reads only."""
TRAINER = "trainer"
"""`mlops train`: creates runs and model versions."""
PROMOTER = "promoter"
"""`mlops promote`: reads the source stage, writes into the target stage."""
IDENTITIES = (READER, TRAINER, PROMOTER)
"""The identities the stack logs in as, each with its password derived from the stage's MLflow secret; the MLflow
image creates each (and the admin) from the password hashes the program hands it."""

# The label that names which part of the stack a container, service or volume is: the program writes it,
# `mlops status` and `mlops settle` group by it.
COMPONENT_LABEL = "mlops.component"
SECRET_FILES_SUFFIX = "-secrets"
"""Names a workload's secret files on one host: the volume `<workload>-secrets` and the container that writes them
into it, again whenever it is created; so the volume holds no data (`mlops diff`)."""

REGISTRY_PASSWORD = "registryPassword"
MLFLOW_PASSWORD = "mlflowPassword"
"""The stack's config secrets, `mlops:<key>`."""
DOCKER_CA_CERT = "dockerCaCert"
DOCKER_CLIENT_CERT = "dockerClientCert"
DOCKER_CLIENT_KEY = "dockerClientKey"
DOCKER_TLS_KEYS = (DOCKER_CA_CERT, DOCKER_CLIENT_CERT, DOCKER_CLIENT_KEY)
"""The config secrets, PEM text, a stack whose Docker host is reached over TLS (`docker.uses_tls`) connects with:
the CA that signed the host's certificate, and the client certificate and key the host trusts (`mlops:<key>`)."""
MODEL_SIGNING_KEY = "modelSigningKey"
"""The config secret of a stage that trains: the Ed25519 private key (PEM) `mlops train` signs each new model
version with, outside every container, so neither MLflow, a training run's code nor a replica ever holds it."""
TRUSTED_MODEL_KEYS = "trustedModelKeys"
"""Plain config (`mlops:<key>`, reviewed in `Pulumi.<stack>.yaml`): the Ed25519 public keys (PEM blocks, one or
more) whose signatures the stage's replicas load and `mlops promote` into the stage accepts."""

# How a model version vouches for its bytes: the training run tags the version with the sha256 of its two files,
# `mlops train` signs the model's name and both hashes; MLflow's access rules (images/mlflow/access.py) let each
# of these tags be set once and never changed, and a replica loads nothing whose signature no trusted key verifies.
MODEL_HASH_TAG = "sha256"
MANIFEST_HASH_TAG = "manifest_sha256"
SIGNATURE_TAG = "signature"
"""Base64 of the Ed25519 signature of `signed_message`."""
WRITE_ONCE_TAGS = (MODEL_HASH_TAG, MANIFEST_HASH_TAG, SIGNATURE_TAG)
SKOPS_FILE = "model.skops"
SKOPS_OUTPUT = "skops"
"""Where a model's project asks for skops (docs/contracts.md), its run also holds `model/<SKOPS_FILE>`, which the
signed manifest describes as `outputs.<SKOPS_OUTPUT>: {sha256, trusted_types}`; replicas (both runtimes) load that file,
never the pickle, trusting skops's defaults and those types alone."""

# Ports the images listen on, inside the stage network; the stage files choose the host ports they are published on.
MLFLOW_PORT = 5000
IMAGE_REGISTRY_PORT = 5000
SERVING_PORT = 8080
"""A serving replica's V2 inference API."""
SERVING_METRICS_PORT = 8082
GATEWAY_PORT = 8080
GATEWAY_METRICS_PORT = 9102
"""Metrics on ports of their own, reached only on the stage network: neither is published or routed."""
PROMETHEUS_PORT = 9090

# The most of an MLflow answer anything of the stack reads (`mlops promote`, the serving replicas): a registry that
# streams without end, or a model.pkl nobody could load, fails the read instead of filling the reader's memory.
MAX_MODEL_BYTES = 1024 * 1024 * 1024
"""model.pkl: a GiB is far beyond a replica's memory limit once unpickled, and loads nowhere the stack runs."""
MAX_MLFLOW_ANSWER_BYTES = 64 * 1024 * 1024
"""Every other answer (REST JSON, manifest.json): 10,000 versions with their tags are a few MiB."""

# The artifact store's volumes, `<stack>-<volume>` on the engine (volume_name).
ARTIFACTS_VOLUME = "artifacts"
MLFLOW_DB_VOLUME = "mlflow-db"
REGISTRY_DATA_VOLUME = "registry-data"
DATASETS_VOLUME = "datasets"
METRICS_VOLUME = "metrics"
ROLLOUT_VOLUME = "rollout"
SAMPLES_VOLUME = "samples"

# Where the images mount them (docs/contracts.md); each image owns the folder, which an empty volume takes on.
MLFLOW_DB_DIR = "/data/db"
ARTIFACTS_DIR = "/data/artifacts"
REGISTRY_DATA_DIR = "/var/lib/registry"
DATASETS_DIR = "/data/datasets"
SAMPLES_DIR = "/data/samples"
PROMETHEUS_DATA_DIR = "/prometheus"
ROLLOUT_DIR = "/data/rollout"
"""Where the gateway records each model's rollout, events and state in `ROLLOUT_DIR/<model>/`, on the stage's
rollout volume."""

def rollout_folder(model: str) -> str:
    """Where the gateway records `model`'s rollout (images/gateway/canary.py)."""
    return f"{ROLLOUT_DIR}/{model}"


def datasets_folder(model: str) -> str:
    """Where `model`'s datasets are on the datasets volume: a folder per model, which its training image alone
    reads and writes (images/training/mlops_training/datasets.py's `model_folder`)."""
    return f"{DATASETS_DIR}/{model}"


class MlflowEnv:
    """What the model registry's container gets (images/mlflow/start.py, access.py)."""
    PASSWORD_HASHES = "MLOPS_MLFLOW_PASSWORD_HASHES"
    """`identity:hash` per line for the admin and every identity (components/model_registry.py), so the container
    never holds the stage's MLflow secret or a password."""
    PUBLISHED_HOST = "MLOPS_PUBLISHED_HOST"
    TRUSTED_MODEL_KEYS = "MODEL_SIGNING_KEYS"
    """The public keys the stage's replicas trust: a model version's signature must verify with one of them."""


class RegistryEnv:
    """What the image registry's container gets (images/registry/entrypoint.sh)."""
    HTPASSWD_ENTRY = "REGISTRY_HTPASSWD_ENTRY"


class TlsEnv:
    """What MLflow's and the image registry's containers get when their port is published off loopback
    (mlops_spec/service_tls.py); without them they speak plain HTTP."""
    CERTIFICATE = "MLOPS_TLS_CERTIFICATE"
    """PEM of the server's certificate and its CA's."""
    KEY = "MLOPS_TLS_KEY"
    """PEM of the server's private key (on a swarm the file `MLOPS_TLS_KEY_FILE` names)."""


class TrackingEnv:
    """How a serving replica and a training run reach MLflow: MLflow's own client variables."""
    URI = "MLFLOW_TRACKING_URI"
    USERNAME = "MLFLOW_TRACKING_USERNAME"
    PASSWORD = "MLFLOW_TRACKING_PASSWORD"
    CA_CERTIFICATE = "MLOPS_MLFLOW_CA_CERTIFICATE"
    """PEM of the CA MLflow's certificate must verify with, where MLflow speaks TLS (mlops_spec/service_tls.py)."""


class ReplicaEnv:
    """What a serving replica gets (images/serving): its model pin, drift scoring, sampling and batching."""
    MODEL_NAME = "MODEL_NAME"
    MODEL_VERSION = "MODEL_VERSION"
    MODEL_SHA256 = "MODEL_SHA256"
    SERVING_RUNTIME = "SERVING_RUNTIME"
    DRIFT_WINDOW_ROWS = "DRIFT_WINDOW_ROWS"
    SAMPLE_FRACTION = "SAMPLE_FRACTION"
    SAMPLES_FILE = "SAMPLES_FILE"
    SAMPLES_MAX_BYTES = "SAMPLES_MAX_BYTES"
    MAX_BATCH_SIZE = "MAX_BATCH_SIZE"
    MAX_BATCH_TIME_MS = "MAX_BATCH_TIME_MS"
    SIGNING_KEYS = "MODEL_SIGNING_KEYS"
    """The stage's trusted public keys (TRUSTED_MODEL_KEYS), PEM: not a secret."""


class TrainingEnv:
    """What a training run gets besides TrackingEnv (images/training)."""
    IMAGE_DIGEST = "TRAINING_IMAGE_DIGEST"


class GatewayEnv:
    """What the gateway gets (images/gateway): the models it routes, and where to judge and record their rollouts
    when one declares any."""
    MODELS = "GATEWAY_MODELS"
    """As JSON, each model: name, blue and green replicas, weights and green's rollout."""
    PROMETHEUS_URL = "PROMETHEUS_URL"
    SCRAPE_INTERVAL_S = "SCRAPE_INTERVAL_S"
    ROLLOUT_DIR = "ROLLOUT_DIR"


class PrometheusEnv:
    """What Prometheus's container gets (images/prometheus/start.py)."""
    CONFIG = "PROMETHEUS_CONFIG"
    DRIFT_THRESHOLD = "DRIFT_THRESHOLD"
    RETENTION_DAYS = "RETENTION_DAYS"


def network_name(stack: str) -> str:
    return f"{stack}-net"


def volume_name(stack: str, volume: str) -> str:
    return f"{stack}-{volume}"


def model_registry_name(stack: str) -> str:
    return f"{stack}-model-registry"


def image_registry_name(stack: str) -> str:
    return f"{stack}-image-registry"


def serving_name(stack: str, model: str, slot: str) -> str:
    """The replicas of one slot (blue or green) of a model: a Swarm service, or containers `<name>-<index>`."""
    return f"{stack}-{model}-{slot}"


def gateway_name(stack: str) -> str:
    return f"{stack}-gateway"


def prometheus_name(stack: str) -> str:
    return f"{stack}-prometheus"


def tracking_uri(stack: str, tls: bool) -> str:
    """MLflow as the stage's containers reach it on the stage network."""
    return f"{'https' if tls else 'http'}://{model_registry_name(stack)}:{MLFLOW_PORT}"


def derived_password(secret: str, identity: str) -> str:
    return hmac.new(secret.encode(), identity.encode(), hashlib.sha256).hexdigest()


def secret_variable(key: str, stage: str) -> str:
    """`registryPassword`, `staging` -> `MLOPS_REGISTRY_PASSWORD_STAGING`: where CI hands a stage's secret over."""
    words = re.sub(r"(?<!^)(?=[A-Z])", "_", key).upper()
    return f"MLOPS_{words}_{stage.upper().replace('-', '_')}"


def signed_message(model: str, model_sha256: str, manifest_sha256: str) -> bytes:
    """What a model version's signature signs (images/serving/serving/registry.py keeps a copy): the name binds it
    to its model, so one model's signed bytes never pass as another's."""
    return f"mlops-model-v1\n{model}\n{model_sha256}\n{manifest_sha256}\n".encode()


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
    rollout: Optional[tuple[ModelPin, RolloutPolicy]] = None
    """The green release and the policy the gateway rolls it out by, when the model declares one."""


def gateway_env(models: Sequence[GatewayRoute], prometheus_url: str | None, scrape_interval_s: int | None) -> dict[str, str]:
    """What the gateway needs (images/gateway/gateway.py reads it): GATEWAY_MODELS, and with a rollout where to
    judge it (`prometheus_url`, which a rollout requires) and where to record it."""
    declared, rollouts = [], False
    for model in models:
        entry: dict[str, object] = {"name": model.name, "blue": list(model.blue), "green": list(model.green),
                                    "weights": {"blue": model.traffic.blue, "green": model.traffic.green}}
        if model.rollout is not None:
            green, policy = model.rollout
            entry["rollout"] = {"policy": policy.model_dump(), "green_release": release_id(green)}
            rollouts = True
        declared.append(entry)
    env = {GatewayEnv.MODELS: json.dumps(declared)}
    if rollouts:
        assert prometheus_url is not None and scrape_interval_s is not None, "a rollout is judged by Prometheus"
        env |= {GatewayEnv.PROMETHEUS_URL: prometheus_url, GatewayEnv.SCRAPE_INTERVAL_S: str(scrape_interval_s),
                GatewayEnv.ROLLOUT_DIR: ROLLOUT_DIR}
    return env
