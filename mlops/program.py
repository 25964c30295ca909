"""The Pulumi program shared by `__main__.py`, `mlops plan` and the tests: spec in, stack and exports out."""
from __future__ import annotations

import pulumi

from components.stack import MLOpsStack
from mlops.experiments import EXPERIMENT_CONFIG_KEY, experiment_spec
from mlops.signing import SigningError, public_keys
from mlops_spec.contract import MODEL_SIGNING_KEY, TRUSTED_MODEL_KEYS
from mlops_spec.errors import SpecError
from mlops_spec.loading import load_stages, stage_names
from mlops_spec.models import StageSpec


def load_stack_spec(stack: str, config: pulumi.Config) -> StageSpec:
    """Stack `dev` reads `environments/dev.yaml`, and so on for every stage file; `exp-NAME` stacks carry their
    settings in config."""
    if stack in stage_names():
        return load_stages([stack])[0]
    settings = config.get_object(EXPERIMENT_CONFIG_KEY)
    if not stack.startswith("exp-") or settings is None:
        raise SpecError(file=f"Pulumi.{stack}.yaml", field=f"mlops:{EXPERIMENT_CONFIG_KEY}",
                        message=f"stack '{stack}' is none of {', '.join(stage_names())}; experiment stacks "
                                "are named exp-NAME and created by `mlops exp up NAME`")
    return experiment_spec(stack, settings)


def trusted_model_keys(stack: str, spec: StageSpec, config: pulumi.Config) -> str | None:
    """The public keys the stage's replicas accept model signatures from (and its MLflow accepts signature tags by),
    checked here so that a stage serving a model without them, or with a key that is not Ed25519, fails before
    anything is deployed."""
    keys = config.get(TRUSTED_MODEL_KEYS)
    where = f"Pulumi.{stack}.yaml"
    if not keys:
        if not spec.served_models():
            return None
        raise SpecError(file=where, field=f"mlops:{TRUSTED_MODEL_KEYS}",
                        message="a stage that serves a model needs the public keys its replicas accept model "
                                "signatures from: `openssl pkey -pubout < signing-key.pem | pulumi config set "
                                f"mlops:{TRUSTED_MODEL_KEYS} --stack {stack}`, where signing-key.pem is the "
                                f"mlops:{MODEL_SIGNING_KEY} of the stage that trains (docs/security.md)")
    try:
        public_keys(keys, "the value")
    except SigningError as err:
        raise SpecError(file=where, field=f"mlops:{TRUSTED_MODEL_KEYS}", message=str(err)) from None
    return keys


def declare_stack(stack: str, spec: StageSpec) -> MLOpsStack:
    config = pulumi.Config("mlops")
    password = config.require_secret("registryPassword") if spec.image_registry.enabled else None
    mlops_stack = MLOpsStack(stack, {"spec": spec, "registry_password": password,
                                     "mlflow_password": config.require_secret("mlflowPassword"),
                                     "trusted_model_keys": trusted_model_keys(stack, spec, config)})
    for key, value in mlops_stack.exports().items():
        pulumi.export(key, value)
    return mlops_stack
