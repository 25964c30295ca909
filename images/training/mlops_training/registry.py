"""Logs a training run to MLflow and registers its model as a new version of the model name."""
from __future__ import annotations

import os
import re
import tempfile

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient

from mlops_training.runner import TrainingResult, sha256_file

ARTIFACT_PATH = "model"
# Copies of mlops_spec.contract's (tests/test_contract.py checks them): the tags `mlops train` signs, and that
# MLflow (images/mlflow/access.py) lets no writer change once set.
MODEL_HASH_TAG = "sha256"
MANIFEST_HASH_TAG = "manifest_sha256"
CA_CERTIFICATE_VARIABLE = "MLOPS_MLFLOW_CA_CERTIFICATE"
CA_PATH_VARIABLE = "MLFLOW_TRACKING_SERVER_CERT_PATH"
PASSWORD_VARIABLE = "MLFLOW_TRACKING_PASSWORD"
# MLflow's client retries a failing request 7 times with backoff factor 2: a server that keeps answering 500
# (its artifact store full) held a training run for 279 s before it failed. 5 retries with factor 1 wait
# about 31 s in all, longer than the stage's MLflow takes to restart (about 10 s), so a restart is still
# ridden out. The run's environment can still set either.
RETRY_BUDGET = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
# How MLflow's client (through urllib3) reports a server that failed every try.
SERVER_FAILED_EVERY_TRY = re.compile(r"too many (5\d\d) error responses")


class FilesNotStored(MlflowException):
    """MLflow did not store the model's files; nothing was registered."""


def trust_stage_ca() -> None:
    """Where the stage's MLflow speaks TLS, MLflow's client verifies it with the stage's CA alone: the PEM the run
    gets goes to the file MLflow's own variable names."""
    if ca_certificate := os.environ.get(CA_CERTIFICATE_VARIABLE):
        descriptor, path = tempfile.mkstemp(prefix="mlflow-ca-", suffix=".pem")
        with os.fdopen(descriptor, "w", encoding="utf-8") as out:
            out.write(ca_certificate)
        os.environ[CA_PATH_VARIABLE] = path


def password_from_file() -> None:
    """`mlops train` gives the run MLflow's password as the file `MLFLOW_TRACKING_PASSWORD_FILE` names, never in
    its configuration; MLflow's client reads its own variable, which is set here, in this process alone, once
    the project's entrypoint is done."""
    if file := os.environ.get(f"{PASSWORD_VARIABLE}_FILE"):
        with open(file, encoding="utf-8") as handle:
            os.environ[PASSWORD_VARIABLE] = handle.read().strip()


def register(result: TrainingResult, tracking_uri: str) -> int:
    """Log `model.pkl` and `manifest.json` (and `model.skops`, which the manifest hashes) under the run's `model/`
    folder, register that folder as a new version and tag the version with the sha256 of the model and the manifest
    (which `mlops train` then signs) and the metrics, so promotion reads them from the version alone. Returns the
    version number."""
    for variable, value in RETRY_BUDGET.items():
        os.environ.setdefault(variable, value)
    password_from_file()
    trust_stage_ca()
    manifest = result.manifest
    name = manifest["model_name"]
    hashes = {MODEL_HASH_TAG: result.model_sha256, MANIFEST_HASH_TAG: sha256_file(result.manifest_path)}
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    mlflow.set_experiment(name)
    with mlflow.start_run() as run:
        mlflow.log_params({"seed": manifest["inputs"]["seed"], "subset": manifest["inputs"]["subset"],
                           "dataset": manifest["inputs"]["dataset"],
                           **manifest["inputs"]["params"]})
        mlflow.log_metrics(result.metrics)
        mlflow.set_tags({**hashes, "code_version": manifest["inputs"]["code_version"]})
        try:
            for file in result.files:
                mlflow.log_artifact(str(file), ARTIFACT_PATH)
        except MlflowException as err:
            # The server's answer is a bare 500; only its log has the reason, typically a full volume.
            failed = SERVER_FAILED_EVERY_TRY.search(err.message)
            if failed is None:
                raise
            raise FilesNotStored(f"MLflow answered HTTP {failed[1]} to every try to store the model's files: its "
                                 "artifact store may be full or not writable (the MLflow server's log says why); "
                                 "nothing was registered") from err
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    version = client.create_model_version(
        name, source=f"{run.info.artifact_uri}/{ARTIFACT_PATH}", run_id=run.info.run_id,
        tags={**hashes, **{key: str(value) for key, value in result.metrics.items()}})
    return int(version.version)

