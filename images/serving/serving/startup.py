"""What both runtimes do before serving: read the keys the stage trusts, fetch the pinned model once its signature
and hashes check out, and read its schema, or exit non-zero saying why in one line."""
from __future__ import annotations

import logging
import os
import pickle
import sys
from typing import Any

import skops.io

from serving.registry import (
    CA_CERTIFICATE_VARIABLE,
    SIGNING_KEYS_VARIABLE,
    FetchedModel,
    MlflowRegistry,
    ModelPin,
    ModelRefused,
    RegistryUnreachable,
    trusted_keys,
)
from serving.schema import ModelSchema, SchemaError

log = logging.getLogger("serving")


def tracking_password() -> str:
    """MLflow's password for the replica: from the file MLFLOW_TRACKING_PASSWORD_FILE names (what the stack gives:
    a Swarm secret, or on one host a file of the slot's secrets volume), else MLflow's own variable (the image
    run by hand)."""
    file = os.environ.get("MLFLOW_TRACKING_PASSWORD_FILE")
    if file:
        with open(file, encoding="utf-8") as handle:
            return handle.read().strip()
    return os.environ.get("MLFLOW_TRACKING_PASSWORD", "")


def fetch_pinned_model(runtime: str) -> FetchedModel:
    """The model the environment pins, for this image's `runtime` (its build target), signed by a key of
    MODEL_SIGNING_KEYS (its skops form where the model has one); a refusal exits before anything is loaded, and
    the restart policy keeps the replica unready."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    try:
        declared = os.environ.get("SERVING_RUNTIME", runtime)
        if declared != runtime:
            raise ModelRefused(f"SERVING_RUNTIME is {declared} but this image is the {runtime} build target; "
                               f"build the serving image with --target {declared}")
        pin = ModelPin.from_env()
        trusted = trusted_keys(os.environ.get(SIGNING_KEYS_VARIABLE, ""))
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            raise ModelRefused("set MLFLOW_TRACKING_URI to the model registry, e.g. http://<stack>-model-registry:5000")
        fetched = MlflowRegistry(os.environ["MLFLOW_TRACKING_URI"], trusted=trusted,
                                 username=os.environ.get("MLFLOW_TRACKING_USERNAME", ""),
                                 password=tracking_password(),
                                 ca_certificate=os.environ.get(CA_CERTIFICATE_VARIABLE, "")
                                 ).fetch(pin)
    except (ModelRefused, RegistryUnreachable) as refusal:
        log.error("%s", refusal)
        sys.exit(1)
    log.info("serving model %s v%s sha256 %s, signed by a trusted key%s, from %s", fetched.name, fetched.version,
             fetched.sha256, "" if pin.sha256 else " (no sha256 pinned: the signed tag is the check)",
             "model.pkl" if fetched.skops_trusted_types is None else "model.skops, loaded without pickle")
    return fetched


def loaded_model(fetched: FetchedModel) -> Any:
    """The fitted model: built by skops from model.skops, trusting its defaults and only the types the signed
    manifest lists, where the model has that form; else unpickled. A file holding any other type exits, as a
    refused model does, before any of it is built."""
    if fetched.skops_trusted_types is None:
        # Unpickling runs code: only bytes a trusted key signed (registry.py checked) get here.
        return pickle.loads(fetched.payload)
    trusted = list(fetched.skops_trusted_types)
    untrusted = sorted(set(skops.io.get_untrusted_types(data=fetched.payload)) - set(trusted))
    if untrusted:
        log.error("refusing model %s v%s: model.skops holds types neither skops nor its signed manifest trusts: %s",
                  fetched.name, fetched.version, ", ".join(untrusted))
        sys.exit(1)
    return skops.io.loads(fetched.payload, trusted=trusted)


def model_schema(fetched: FetchedModel, n_features: int) -> ModelSchema:
    """What the fetched model's manifest says it takes; a schema that does not fit the model exits, as a
    refused model does."""
    try:
        return ModelSchema.of(fetched.manifest, n_features)
    except SchemaError as error:
        log.error("refusing model %s v%s: %s", fetched.name, fetched.version, error)
        sys.exit(1)
