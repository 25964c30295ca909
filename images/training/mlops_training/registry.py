"""Logs a training run to MLflow and registers its model as a new version of the model name."""
from __future__ import annotations

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient

from mlops_training.train import TrainingResult

ARTIFACT_PATH = "model"


def register(result: TrainingResult, tracking_uri: str) -> int:
    """Log `model.pkl` and `manifest.json` under the run's `model/` folder, register that folder as a new
    version and tag the version with the model's sha256 and metrics, so promotion reads them from the
    version alone. Returns the version number."""
    manifest = result.manifest
    name = manifest["model_name"]
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    mlflow.set_experiment(name)
    with mlflow.start_run() as run:
        mlflow.log_params({"seed": manifest["inputs"]["seed"], "subset": manifest["inputs"]["subset"],
                           **manifest["inputs"]["params"]})
        mlflow.log_metrics(result.metrics)
        mlflow.set_tags({"sha256": result.model_sha256, "code_version": manifest["inputs"]["code_version"]})
        mlflow.log_artifact(str(result.model_path), ARTIFACT_PATH)
        mlflow.log_artifact(str(result.manifest_path), ARTIFACT_PATH)
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    version = client.create_model_version(
        name, source=f"{run.info.artifact_uri}/{ARTIFACT_PATH}", run_id=run.info.run_id,
        tags={"sha256": result.model_sha256, **{key: str(value) for key, value in result.metrics.items()}})
    return int(version.version)
