"""A stage's model registry as `mlops promote` needs it: fetch a version, read its metrics, publish a copy.

`ModelStore` is the interface; `MlflowStore` speaks the MLflow REST API of a stage's tracking server
(`mlflow server --serve-artifacts`, so artifacts go through the server and no storage credentials are
needed) with nothing but the stdlib, as one of the server's basic-auth users where it requires one. Training contract (docs/contracts.md): a version's run holds
`model/model.pkl` and `model/manifest.json` (and `model/model.skops` where the manifest describes one), the version
is tagged `sha256` of `model.pkl`, and metrics are logged on the run.
"""
from __future__ import annotations

import base64
import hashlib
import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

from mlops_spec.contract import MAX_MLFLOW_ANSWER_BYTES, MAX_MODEL_BYTES, SKOPS_FILE, SKOPS_OUTPUT

MODEL_FILES = ("model.pkl", "manifest.json")
MODEL_ARTIFACT_DIR = "model"
PROMOTIONS_EXPERIMENT = "promotions"
PROXIED_ARTIFACTS_SCHEME = "mlflow-artifacts:"


class StoreError(Exception):
    """The registry cannot answer what was asked (unreachable, missing version, missing artifact)."""


class NotFound(StoreError):
    """The registry answered that what was asked for does not exist."""


class ServerFailed(StoreError):
    """The registry answered with a server error (5xx)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    files: dict[str, bytes]
    tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        """The sha256 of `model.pkl` as downloaded, whatever the registry's tag claims."""
        return hashlib.sha256(self.files["model.pkl"]).hexdigest()


def skops_sha256(manifest: bytes) -> Optional[str]:
    """The sha256 the manifest gives the model's skops form, or None where it has none (or is no manifest)."""
    try:
        offered = json.loads(manifest).get("outputs", {}).get(SKOPS_OUTPUT)
    except (ValueError, AttributeError):
        return None
    return str(offered.get("sha256")) if isinstance(offered, dict) else None


@dataclass(frozen=True)
class BasicAuth:
    username: str
    password: str = field(repr=False)

    @property
    def header(self) -> str:
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


class ModelStore(Protocol):
    url: str

    def latest_version(self, name: str) -> int: ...

    def fetch(self, name: str, version: int) -> ModelVersion: ...

    def find_version(self, name: str, sha256: str) -> Optional[int]: ...

    def next_version(self, name: str) -> int: ...

    def publish(self, model: ModelVersion, tags: dict[str, str]) -> int: ...

    def set_version_tag(self, name: str, version: int, key: str, value: str) -> None: ...


class MlflowStore:
    def __init__(self, url: str, auth: Optional[BasicAuth] = None, timeout_s: float = 30.0,
                 ca_certificate: Optional[str] = None) -> None:
        """`ca_certificate`: PEM of the only CA an https:// `url`'s certificate may verify with (the stage's,
        mlops_spec/service_tls.py); where it is None, the system's CAs."""
        self.url = url.rstrip("/")
        self.auth = auth
        self.timeout_s = timeout_s
        self.tls = ssl.create_default_context(cadata=ca_certificate) if ca_certificate else None

    # -- reading ---------------------------------------------------------------------------------------
    def latest_version(self, name: str) -> int:
        versions = self._versions(name)
        if not versions:
            raise StoreError(f"model {name} has no registered version in {self.url}")
        return max(int(version["version"]) for version in versions)

    def fetch(self, name: str, version: int) -> ModelVersion:
        """Version `version` with its files, tags and the metrics of its run (numeric version tags as fallback)."""
        answer = self._call("GET", "/api/2.0/mlflow/model-versions/get", params={"name": name, "version": str(version)},
                            missing=f"model {name} has no version {version} in {self.url}")
        record = answer["model_version"]
        run = self._call("GET", "/api/2.0/mlflow/runs/get", params={"run_id": record["run_id"]},
                         missing=f"the run of model {name} v{version} is gone from {self.url}")["run"]
        files = {file: self._download(run["info"]["artifact_uri"], f"{MODEL_ARTIFACT_DIR}/{file}", name, version)
                 for file in MODEL_FILES}
        if skops_sha256(files["manifest.json"]) is not None:
            files[SKOPS_FILE] = self._download(run["info"]["artifact_uri"], f"{MODEL_ARTIFACT_DIR}/{SKOPS_FILE}",
                                               name, version)
        tags = {tag["key"]: tag["value"] for tag in record.get("tags", [])}
        metrics = {key: float(value) for key, value in tags.items() if _is_number(value)}
        metrics |= {metric["key"]: float(metric["value"]) for metric in run.get("data", {}).get("metrics", [])}
        return ModelVersion(name=name, version=version, files=files, tags=tags, metrics=metrics)

    def find_version(self, name: str, sha256: str) -> Optional[int]:
        """The version already holding this exact `model.pkl`, so a repeated promote publishes no duplicate."""
        matching = [int(v["version"]) for v in self._versions(name)
                    if {t["key"]: t["value"] for t in v.get("tags", [])}.get("sha256") == sha256]
        return max(matching) if matching else None

    def next_version(self, name: str) -> int:
        versions = self._versions(name)
        return max((int(v["version"]) for v in versions), default=0) + 1

    # -- writing ---------------------------------------------------------------------------------------
    def set_version_tag(self, name: str, version: int, key: str, value: str) -> None:
        self._call("POST", "/api/2.0/mlflow/model-versions/set-tag",
                   body={"name": name, "version": str(version), "key": key, "value": value},
                   missing=f"model {name} has no version {version} in {self.url}")

    def publish(self, model: ModelVersion, tags: dict[str, str]) -> int:
        """Register a copy of `model` (same files, metrics and tags, plus `tags`); returns the new version."""
        experiment_id = self._experiment(PROMOTIONS_EXPERIMENT)
        all_tags = {**model.tags, **tags}
        run = self._call("POST", "/api/2.0/mlflow/runs/create", body={
            "experiment_id": experiment_id, "run_name": f"{model.name}-v{model.version}",
            "start_time": _now_ms(), "tags": _tag_list(all_tags)})["run"]["info"]
        for file, payload in model.files.items():
            self._upload(run["artifact_uri"], f"{MODEL_ARTIFACT_DIR}/{file}", payload)
        metrics = [{"key": key, "value": value, "timestamp": _now_ms(), "step": 0} for key, value in model.metrics.items()]
        self._call("POST", "/api/2.0/mlflow/runs/log-batch", body={"run_id": run["run_id"], "metrics": metrics})
        self._call("POST", "/api/2.0/mlflow/runs/update", body={"run_id": run["run_id"], "status": "FINISHED",
                                                                 "end_time": _now_ms()})
        if not self._registered(model.name):
            self._call("POST", "/api/2.0/mlflow/registered-models/create", body={"name": model.name})
        created = self._call("POST", "/api/2.0/mlflow/model-versions/create", body={
            "name": model.name, "source": f"{run['artifact_uri']}/{MODEL_ARTIFACT_DIR}", "run_id": run["run_id"],
            "tags": _tag_list(all_tags)})
        return int(created["model_version"]["version"])

    # -- REST plumbing ---------------------------------------------------------------------------------
    def _versions(self, name: str) -> list[dict]:
        if not self._registered(name):
            return []
        answer = self._call("GET", "/api/2.0/mlflow/model-versions/search",
                            params={"filter": f"name='{name}'", "max_results": "10000"})
        return answer.get("model_versions", [])

    def _registered(self, name: str) -> bool:
        try:
            self._call("GET", "/api/2.0/mlflow/registered-models/get", params={"name": name})
        except NotFound:
            return False
        return True

    def _experiment(self, name: str) -> str:
        try:
            answer = self._call("GET", "/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": name})
        except NotFound:
            return self._call("POST", "/api/2.0/mlflow/experiments/create", body={"name": name})["experiment_id"]
        return answer["experiment"]["experiment_id"]

    def _artifact_path(self, artifact_uri: str, artifact: str) -> str:
        """`mlflow-artifacts:/1/<run>/artifacts` -> the server's artifact proxy path for `artifact`."""
        if not artifact_uri.startswith(PROXIED_ARTIFACTS_SCHEME):
            raise StoreError(f"run artifacts at {artifact_uri} are not served by {self.url}; "
                             "run the tracking server with --serve-artifacts")
        location = urllib.parse.urlsplit(artifact_uri).path.strip("/")
        return "/api/2.0/mlflow-artifacts/artifacts/" + urllib.parse.quote(f"{location}/{artifact}")

    def _download(self, artifact_uri: str, artifact: str, name: str, version: int) -> bytes:
        return self._request("GET", self._artifact_path(artifact_uri, artifact),
                             missing=f"model {name} v{version} has no artifact {artifact} in {self.url}",
                             limit=MAX_MODEL_BYTES if artifact.endswith(("model.pkl", SKOPS_FILE))
                             else MAX_MLFLOW_ANSWER_BYTES)

    def _upload(self, artifact_uri: str, artifact: str, payload: bytes) -> None:
        try:
            self._request("PUT", self._artifact_path(artifact_uri, artifact), data=payload,
                          content_type="application/octet-stream")
        except ServerFailed as err:
            # MLflow's answer is a bare "Internal Server Error"; only its log says why (a full disk, typically).
            raise ServerFailed(f"model registry {self.url} failed to store {artifact} ({len(payload) / 2**20:.1f} MiB) "
                               f"with HTTP {err.status}: its artifact store may be full or not writable (the MLflow "
                               "server's log says why); no version was registered", err.status) from None

    def _call(self, method: str, path: str, *, params: Optional[dict[str, str]] = None,
              body: Optional[dict[str, Any]] = None, missing: Optional[str] = None) -> dict:
        query = "?" + urllib.parse.urlencode(params) if params else ""
        data = json.dumps(body).encode() if body is not None else None
        return json.loads(self._request(method, path + query, data=data, content_type="application/json",
                                        missing=missing) or b"{}")

    def _request(self, method: str, path: str, *, data: Optional[bytes] = None, content_type: str = "",
                 missing: Optional[str] = None, limit: int = MAX_MLFLOW_ANSWER_BYTES) -> bytes:
        """One HTTP exchange; an answer that the thing does not exist raises `NotFound(missing)`, one longer than
        `limit` bytes StoreError: a registry that streams without end must not fill the memory of whoever promotes."""
        headers = {"Content-Type": content_type} if content_type else {}
        if self.auth is not None:
            headers["Authorization"] = self.auth.header
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s, context=self.tls) as response:
                declared = response.headers.get("Content-Length", "")
                if (declared.isdigit() and int(declared) > limit) or len(body := response.read(limit + 1)) > limit:
                    raise StoreError(f"model registry {self.url} answered {method} {path.split('?')[0]} with more "
                                     f"than {limit // 2**20} MiB, the most mlops reads from it")
                return body
        except urllib.error.HTTPError as err:
            detail = _mlflow_message(err)
            if err.code == 404 or "RESOURCE_DOES_NOT_EXIST" in detail:
                raise NotFound(missing or f"{self.url}{path.split('?')[0]}: not found {detail}".rstrip()) from None
            if err.code in (401, 403):
                who = f"user {self.auth.username}" if self.auth else "a request without credentials"
                remedy = ("check the stage's Pulumi config secret mlops:mlflowPassword" if err.code == 401 else
                          "the identity may not make this change: a write its role never needs, a write-once file "
                          "or tag, or a signature none of the stage's mlops:trustedModelKeys made (docs/security.md)")
                raise StoreError(f"model registry {self.url} refused {method} {path.split('?')[0]} to {who} "
                                 f"(HTTP {err.code}); {remedy}")
            refused = f"model registry {self.url} refused {method} {path.split('?')[0]}: HTTP {err.code} {detail}".rstrip()
            if err.code >= 500:
                raise ServerFailed(refused, err.code) from None
            raise StoreError(refused) from None
        except (urllib.error.URLError, OSError) as err:
            if isinstance(getattr(err, "reason", err), ssl.SSLCertVerificationError):
                raise StoreError(f"model registry {self.url} is not the stage's: its certificate does not verify with "
                                 f"the CA the stage's mlops:mlflowPassword makes ({getattr(err, 'reason', err)})") from None
            raise StoreError(f"model registry {self.url} is not reachable "
                             f"({getattr(err, 'reason', err)}); is the stage up?") from None


def _tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"key": key, "value": value} for key, value in tags.items()]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _mlflow_message(err: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(err.read())
    except ValueError:
        return ""
    return f"({body.get('error_code', '')}: {body.get('message', '')})"
