"""The models the benchmark stages serve, and how they get into a stage's MLflow registry.

A scaled logistic regression on iris, the one model every server in figure 1 serves, predicts in well under a
millisecond, so the serving figure compares the servers rather than scikit-learn's prediction time. dev also
serves a regressor on scikit-learn's diabetes data; a plain scaled Ridge stands in for its project's pipeline
(the replica needs a version to serve, not the project's own transformer).
"""
from __future__ import annotations

import json
import pickle
import ssl
import urllib.error
import urllib.request
from typing import Callable, Iterable

from sklearn.datasets import load_diabetes, load_iris
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mlops.modelstore import BasicAuth
from tests.model_signing import SESSION_SIGNER, manifest_of

MODEL_NAME = "iris-classifier"
REGRESSOR_NAME = "diabetes-regressor"
FEATURES = 4
# The training contract (docs/contracts.md): a version's run holds model/model.pkl, tagged with its sha256.
MODEL_ARTIFACT = "model/model.pkl"
MANIFEST_ARTIFACT = "model/manifest.json"


def model_bytes() -> bytes:
    features, labels = load_iris(return_X_y=True)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(features, labels)
    return pickle.dumps(model, protocol=5)


def regressor_bytes() -> bytes:
    features, targets = load_diabetes(return_X_y=True)
    model = make_pipeline(StandardScaler(), Ridge(alpha=1.0)).fit(features, targets)
    return pickle.dumps(model, protocol=5)


TRAINED: dict[str, Callable[[], bytes]] = {MODEL_NAME: model_bytes, REGRESSOR_NAME: regressor_bytes}
"""What the harness registers for each model a benchmark stage may serve."""


def payloads(models: Iterable[str]) -> dict[str, bytes]:
    """A pickled model for each of `models`, by name."""
    names = list(models)
    unknown = sorted(set(names) - TRAINED.keys())
    if unknown:
        raise ValueError(f"benchmarks/model.py trains no payload for {', '.join(unknown)}; it knows {', '.join(TRAINED)}")
    return {name: TRAINED[name]() for name in names}


def sample_rows(count: int) -> list[list[float]]:
    features, _ = load_iris(return_X_y=True)
    return [features[index % len(features)].tolist() for index in range(count)]


class MlflowRegistry:
    """The MLflow REST calls that register a model version the way `mlops train` does, as its user."""

    def __init__(self, tracking_uri: str, auth: BasicAuth, ca_certificate: str | None = None) -> None:
        """`ca_certificate`: the stage's CA, where its MLflow speaks TLS."""
        self.base = tracking_uri.rstrip("/")
        self.auth = auth
        self.tls = ssl.create_default_context(cadata=ca_certificate) if ca_certificate else None

    def register(self, name: str, payload: bytes, manifest: bytes | None = None) -> str:
        """Log `payload` as a run's model.pkl and `manifest` (else one naming only its hash) as its manifest.json,
        register it as a new version of `name`, tagged and signed as `mlops train` leaves it; returns the version."""
        manifest = manifest_of(payload) if manifest is None else manifest
        try:
            self._call("POST", "registered-models/create", {"name": name})
        except urllib.error.HTTPError as error:
            if error.code != 400:  # RESOURCE_ALREADY_EXISTS: a further version of a known model
                raise
        run = self._call("POST", "runs/create", {"experiment_id": "0"})["run"]["info"]
        location = run["artifact_uri"].split(":", 1)[1].strip("/")
        self._request("PUT", f"/api/2.0/mlflow-artifacts/artifacts/{location}/{MODEL_ARTIFACT}", payload,
                      "application/octet-stream")
        self._request("PUT", f"/api/2.0/mlflow-artifacts/artifacts/{location}/{MANIFEST_ARTIFACT}", manifest,
                      "application/json")
        version = self._call("POST", "model-versions/create", {
            "name": name, "source": f"{run['artifact_uri']}/model", "run_id": run["run_id"]})["model_version"]["version"]
        for key, value in SESSION_SIGNER.tags(name, payload, manifest).items():
            self._call("POST", "model-versions/set-tag", {"name": name, "version": version, "key": key, "value": value})
        return version

    def _call(self, method: str, endpoint: str, body: dict) -> dict:
        return json.loads(self._request(method, f"/api/2.0/mlflow/{endpoint}", json.dumps(body).encode(),
                                        "application/json") or b"{}")

    def _request(self, method: str, path: str, body: bytes, content_type: str) -> bytes:
        request = urllib.request.Request(self.base + path, data=body, method=method,
                                         headers={"Content-Type": content_type, "Authorization": self.auth.header})
        with urllib.request.urlopen(request, timeout=30, context=self.tls) as response:
            return response.read()
