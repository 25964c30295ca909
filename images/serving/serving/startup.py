"""What both runtimes do before serving: fetch and verify the pinned model and read its schema, or exit non-zero
saying why."""
from __future__ import annotations

import logging
import os
import sys

from serving.registry import FetchedModel, MlflowRegistry, ModelPin, ModelRefused, RegistryUnreachable
from serving.schema import ModelSchema, SchemaError

log = logging.getLogger("serving")


def tracking_password() -> str:
    """MLflow's password for the replica: from the file MLFLOW_TRACKING_PASSWORD_FILE names (a Swarm secret
    under /run/secrets), else MLflow's own variable (one Docker host)."""
    file = os.environ.get("MLFLOW_TRACKING_PASSWORD_FILE")
    if file:
        with open(file, encoding="utf-8") as handle:
            return handle.read().strip()
    return os.environ.get("MLFLOW_TRACKING_PASSWORD", "")


def fetch_pinned_model(runtime: str) -> FetchedModel:
    """The model the environment pins, for this image's `runtime` (its build target); a refusal exits,
    and the restart policy keeps the replica unready."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    try:
        declared = os.environ.get("SERVING_RUNTIME", runtime)
        if declared != runtime:
            raise ModelRefused(f"SERVING_RUNTIME is {declared} but this image is the {runtime} build target; "
                               f"build the serving image with --target {declared}")
        pin = ModelPin.from_env()
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            raise ModelRefused("set MLFLOW_TRACKING_URI to the model registry, e.g. http://<stack>-model-registry:5000")
        fetched = MlflowRegistry(os.environ["MLFLOW_TRACKING_URI"], username=os.environ.get("MLFLOW_TRACKING_USERNAME", ""),
                                 password=tracking_password()).fetch(pin)
    except (ModelRefused, RegistryUnreachable) as refusal:
        log.error("%s", refusal)
        sys.exit(1)
    log.info("serving model %s v%s sha256 %s%s", fetched.name, fetched.version, fetched.sha256,
             "" if pin.sha256 else " (unpinned: checked against the version's sha256 tag)")
    return fetched


def model_schema(fetched: FetchedModel, n_features: int) -> ModelSchema:
    """What the fetched model's manifest says it takes; a schema that does not fit the model exits, as a
    refused model does."""
    try:
        return ModelSchema.of(fetched.manifest, n_features)
    except SchemaError as error:
        log.error("refusing model %s v%s: %s", fetched.name, fetched.version, error)
        sys.exit(1)
