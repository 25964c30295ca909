"""The pinned model, fetched from the MLflow registry over its REST API with nothing but the stdlib.

Training contract: a model version's run holds `model/model.pkl` and `model/manifest.json`, and the
version is tagged `sha256` (of `model.pkl`). Artifacts come through the tracking server's artifact
proxy (`mlflow server --serve-artifacts`), so serving needs no storage credentials, only the read-only
MLflow user it is given (MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, MLflow's own names).
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Mapping

log = logging.getLogger("serving.registry")

MODEL_ARTIFACT = "model/model.pkl"
MANIFEST_ARTIFACT = "model/manifest.json"
PROXIED_ARTIFACTS_SCHEME = "mlflow-artifacts:"
# Copies of mlops_spec.contract's caps (tests/test_contract.py): a registry that answers without end fails the
# fetch instead of filling the replica's memory.
MAX_MODEL_BYTES = 1024 * 1024 * 1024
MAX_MLFLOW_ANSWER_BYTES = 64 * 1024 * 1024


class ModelRefused(Exception):
    """The registry answered, and what it holds must not be served."""


class RegistryUnreachable(Exception):
    """The registry did not answer within the retry budget."""


@dataclass(frozen=True)
class ModelPin:
    name: str
    version: str
    """An integer, or `latest` (dev only: the highest registered version)."""
    sha256: str
    """Empty when unpinned (dev): the version's own sha256 tag is then the only check."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> "ModelPin":
        missing = [key for key in ("MODEL_NAME", "MODEL_VERSION") if not env.get(key)]
        if missing:
            raise ModelRefused(f"set {' and '.join(missing)} to the model this replica serves")
        version = env["MODEL_VERSION"]
        if version != "latest" and not version.isdigit():
            raise ModelRefused(f"MODEL_VERSION must be an integer or 'latest', got {version!r}")
        return cls(name=env["MODEL_NAME"], version=version, sha256=env.get("MODEL_SHA256", "").strip().lower())


@dataclass(frozen=True)
class FetchedModel:
    name: str
    version: str
    sha256: str
    payload: bytes
    manifest: dict | None = None
    """The training run's manifest.json, when the run logged one that names this model's sha256."""


class MlflowRegistry:
    """The few MLflow REST endpoints serving needs; connection failures and 5xx answers are retried."""

    def __init__(self, tracking_uri: str, *, username: str = "", password: str = "", attempts: int = 30,
                 retry_delay_s: float = 2.0, timeout_s: float = 30.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.base = tracking_uri.rstrip("/")
        self.headers = ({"Authorization": "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()}
                        if username else {})
        self.attempts = attempts
        self.retry_delay_s = retry_delay_s
        self.timeout_s = timeout_s
        self.sleep = sleep

    def fetch(self, pin: ModelPin) -> FetchedModel:
        """Download the pinned version's `model.pkl`; raise `ModelRefused` unless its sha256 checks out."""
        version = self._model_version(pin)
        run = self._get_json("/api/2.0/mlflow/runs/get", run_id=version["run_id"])["run"]
        payload = self._get(self._artifact_download_path(run["info"]["artifact_uri"], MODEL_ARTIFACT),
                            limit=MAX_MODEL_BYTES)
        tags = {tag["key"]: tag["value"] for tag in version.get("tags", [])}
        sha256 = verified_sha256(pin.name, version["version"], payload, pinned=pin.sha256, tagged=tags.get("sha256", ""))
        return FetchedModel(name=pin.name, version=version["version"], sha256=sha256, payload=payload,
                            manifest=self._manifest(run["info"]["artifact_uri"], sha256))

    def _manifest(self, artifact_uri: str, sha256: str) -> dict | None:
        """The run's manifest, which serving only reads (the schema, and drift's reference profile): a missing
        or foreign one costs the drift scores and the named inputs, not the model."""
        try:
            manifest = json.loads(self._get(self._artifact_download_path(artifact_uri, MANIFEST_ARTIFACT)))
        except (ModelRefused, ValueError) as error:
            log.warning("no readable %s for this model (%s): no input drift scores, and requests send one "
                        "[N, features] tensor", MANIFEST_ARTIFACT, error)
            return None
        if not isinstance(manifest, dict) or manifest.get("outputs", {}).get("model_sha256") != sha256:
            log.warning("%s describes another model than sha256 %s: no input drift scores, and requests send one "
                        "[N, features] tensor", MANIFEST_ARTIFACT, sha256)
            return None
        return manifest

    def _model_version(self, pin: ModelPin) -> dict:
        if pin.version != "latest":
            return self._get_json("/api/2.0/mlflow/model-versions/get", name=pin.name,
                                  version=pin.version)["model_version"]
        # get-latest-versions answers the newest version of each stage; the highest of them is the newest.
        versions = self._get_json("/api/2.0/mlflow/registered-models/get-latest-versions", name=pin.name)
        if not versions.get("model_versions"):
            raise ModelRefused(f"model {pin.name} has no registered version yet")
        return max(versions["model_versions"], key=lambda version: int(version["version"]))

    @staticmethod
    def _artifact_download_path(artifact_uri: str, artifact: str) -> str:
        """`mlflow-artifacts:/0/<run>/artifacts` (or `mlflow-artifacts://host:port/...`) -> proxy path."""
        if not artifact_uri.startswith(PROXIED_ARTIFACTS_SCHEME):
            raise ModelRefused(f"run artifacts at {artifact_uri} are not served by the tracking server; "
                               "run it with --serve-artifacts")
        location = urllib.parse.urlsplit(artifact_uri).path.strip("/")
        return "/api/2.0/mlflow-artifacts/artifacts/" + urllib.parse.quote(f"{location}/{artifact}")

    def _get_json(self, path: str, **params: str) -> dict:
        return json.loads(self._get(path + "?" + urllib.parse.urlencode(params)))

    def _get(self, path: str, limit: int = MAX_MLFLOW_ANSWER_BYTES) -> bytes:
        url = self.base + path
        for attempt in range(1, self.attempts + 1):
            try:
                with urllib.request.urlopen(urllib.request.Request(url, headers=self.headers),
                                            timeout=self.timeout_s) as response:
                    return capped_read(response, limit, f"{self.base}{path.split('?')[0]}")
            except urllib.error.HTTPError as error:
                if error.code < 500:
                    raise ModelRefused(f"model registry refused {path.split('?')[0]}: HTTP {error.code} "
                                       f"{_mlflow_message(error)}") from None
                reason = f"HTTP {error.code}"
            except (urllib.error.URLError, OSError) as error:
                reason = str(getattr(error, "reason", error))
            if attempt < self.attempts:
                log.warning("model registry %s not reachable yet (%s); retry %d/%d in %.0fs",
                            self.base, reason, attempt, self.attempts - 1, self.retry_delay_s)
                self.sleep(self.retry_delay_s)
        raise RegistryUnreachable(f"model registry {self.base} not reachable after {self.attempts} attempts ({reason})")


def capped_read(response: Any, limit: int, what: str) -> bytes:
    """The whole body, or ModelRefused once it is longer than `limit` bytes (by its Content-Length, or as read)."""
    declared = response.headers.get("Content-Length", "")
    if (declared.isdigit() and int(declared) > limit) or len(body := response.read(limit + 1)) > limit:
        raise ModelRefused(f"{what} answered more than {limit // 2**20} MiB, the most this replica reads from the "
                           "model registry")
    return body


def verified_sha256(name: str, version: str, payload: bytes, *, pinned: str, tagged: str) -> str:
    """The payload's sha256 when it matches the pin (when there is one) and the sha256 the training run
    tagged the version with. Unpickling runs code, so a version nobody vouched for by its sha256 is never
    loaded: in dev, which pins none, the tag is the only check there is."""
    actual = hashlib.sha256(payload).hexdigest()
    if pinned and actual != pinned:
        raise ModelRefused(f"refusing model {name} v{version}: sha256 {actual} does not match pinned {pinned}")
    if not tagged:
        raise ModelRefused(f"refusing model {name} v{version}: the version has no sha256 tag; only versions "
                           "registered by a training run or a promotion (tagged sha256) are served")
    if actual != tagged:
        raise ModelRefused(f"refusing model {name} v{version}: sha256 {actual} does not match "
                           f"the registry's sha256 tag {tagged}")
    return actual


def _mlflow_message(error: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(error.read())
    except ValueError:
        return ""
    return f"({body.get('error_code', '')}: {body.get('message', '')})"
