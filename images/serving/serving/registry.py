"""The pinned model, fetched from the MLflow registry over its REST API, and checked before a byte of it is
loaded.

Training contract (docs/contracts.md): a model version's run holds `model/model.pkl` and `model/manifest.json`;
the version is tagged `sha256` (of model.pkl), `manifest_sha256` (of manifest.json) and `signature`, the Ed25519
signature `mlops train` made of the model's name and both hashes with its stage's private key, which no container
holds. A replica trusts the public keys in MODEL_SIGNING_KEYS alone: a version whose signature none of them
verifies is never downloaded, and files that do not hash to the signed tags are never loaded, so neither a
writer's MLflow password nor MLflow itself can make a replica run code nobody signed. Where the signed manifest
offers `model/model.skops` (its project asked for skops), that file is fetched instead of the pickle and checked
against the sha256 the manifest gives it.

Artifacts come through the tracking server's artifact proxy (`mlflow server --serve-artifacts`), so serving needs
no storage credentials, only the read-only MLflow user it is given (MLFLOW_TRACKING_USERNAME and
MLFLOW_TRACKING_PASSWORD, MLflow's own names).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

log = logging.getLogger("serving.registry")

MODEL_ARTIFACT = "model/model.pkl"
MANIFEST_ARTIFACT = "model/manifest.json"
# Copies of mlops_spec.contract's (tests/test_contract.py checks them).
SKOPS_ARTIFACT = "model/model.skops"
SKOPS_OUTPUT = "skops"
PROXIED_ARTIFACTS_SCHEME = "mlflow-artifacts:"
# Copies of mlops_spec.contract's caps (tests/test_contract.py): a registry that answers without end fails the
# fetch instead of filling the replica's memory.
MAX_MODEL_BYTES = 1024 * 1024 * 1024
MAX_MLFLOW_ANSWER_BYTES = 64 * 1024 * 1024
# Copies of mlops_spec.contract's tag names and signed message (tests/test_contract.py checks them).
MODEL_HASH_TAG = "sha256"
MANIFEST_HASH_TAG = "manifest_sha256"
SIGNATURE_TAG = "signature"
SIGNING_KEYS_VARIABLE = "MODEL_SIGNING_KEYS"
CA_CERTIFICATE_VARIABLE = "MLOPS_MLFLOW_CA_CERTIFICATE"
TRUSTED_KEYS_CONFIG = "mlops:trustedModelKeys"
"""The Pulumi config the program sets SIGNING_KEYS_VARIABLE from."""
PEM_PUBLIC_KEY = re.compile(r"-----BEGIN PUBLIC KEY-----.+?-----END PUBLIC KEY-----", re.DOTALL)


def signed_message(model: str, model_sha256: str, manifest_sha256: str) -> bytes:
    return f"mlops-model-v1\n{model}\n{model_sha256}\n{manifest_sha256}\n".encode()


class ModelRefused(Exception):
    """The registry answered, and what it holds must not be served."""


class RegistryUnreachable(Exception):
    """The registry did not answer within the retry budget."""


def trusted_keys(pem_text: str) -> list[Ed25519PublicKey]:
    """The Ed25519 public keys of MODEL_SIGNING_KEYS (one PEM block each); ModelRefused unless there is at least
    one and every block is one: a replica without a key it trusts would have nothing to check a model by."""
    keys = []
    for block in PEM_PUBLIC_KEY.findall(pem_text):
        try:
            key = load_pem_public_key(block.encode())
        except ValueError:
            key = None
        if not isinstance(key, Ed25519PublicKey):
            raise ModelRefused(f"{SIGNING_KEYS_VARIABLE} holds a PEM block that is no Ed25519 public key; set the "
                               f"stage's Pulumi config {TRUSTED_KEYS_CONFIG} to the `openssl pkey -pubout` of its "
                               "signing keys")
        keys.append(key)
    if not keys:
        raise ModelRefused(f"{SIGNING_KEYS_VARIABLE} holds no public key (-----BEGIN PUBLIC KEY-----), so no model "
                           f"can be trusted; set the stage's Pulumi config {TRUSTED_KEYS_CONFIG}")
    return keys


@dataclass(frozen=True)
class ModelPin:
    name: str
    version: str
    """An integer, or `latest` (dev only: the newest version a trusted key signed)."""
    sha256: str
    """Empty when unpinned (dev): the version's signed sha256 tag is then the check."""

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
    manifest: dict
    """The training run's manifest.json, signed with the model."""
    skops_trusted_types: tuple[str, ...] | None = None
    """None: `payload` is model.pkl; else it is model.skops, to load trusting skops's defaults and these types."""


class MlflowRegistry:
    """The few MLflow REST endpoints serving needs; connection failures and 5xx answers are retried. A version is
    fetched only when one of the `trusted` keys verifies its signature."""

    def __init__(self, tracking_uri: str, *, trusted: Sequence[Ed25519PublicKey], username: str = "",
                 password: str = "", ca_certificate: str = "", attempts: int = 30, retry_delay_s: float = 2.0,
                 timeout_s: float = 30.0, sleep: Callable[[float], None] = time.sleep) -> None:
        """`ca_certificate`: PEM of the only CA an https:// MLflow's certificate may verify with (the stage's)."""
        self.base = tracking_uri.rstrip("/")
        self.tls = ssl.create_default_context(cadata=ca_certificate) if ca_certificate else None
        self.trusted = list(trusted)
        self.headers = ({"Authorization": "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()}
                        if username else {})
        self.attempts = attempts
        self.retry_delay_s = retry_delay_s
        self.timeout_s = timeout_s
        self.sleep = sleep

    def fetch(self, pin: ModelPin) -> FetchedModel:
        """The pinned version's `model.pkl` (or, where the manifest offers it, `model.skops`) and `manifest.json`,
        downloaded once its tags are signed by a trusted key; `ModelRefused` unless every file hashes to what the
        signature vouches for (and the model's sha256 to the pin, if any)."""
        version = self._signed_version(pin)
        name, number, tags = pin.name, version["version"], version_tags(version)
        artifact_uri = self._get_json("/api/2.0/mlflow/runs/get", run_id=version["run_id"])["run"]["info"]["artifact_uri"]
        manifest = verified_manifest(name, number, self._artifact(name, number, artifact_uri, MANIFEST_ARTIFACT),
                                     signed=tags[MANIFEST_HASH_TAG], model_sha256=tags[MODEL_HASH_TAG])
        offered = skops_offer(name, number, manifest)
        if offered is not None:
            # The signed manifest describes the model of the signed tag, and names the skops file's own sha256.
            sha256 = checked_pin(name, number, tags[MODEL_HASH_TAG], pinned=pin.sha256)
            payload = self._artifact(name, number, artifact_uri, SKOPS_ARTIFACT, limit=MAX_MODEL_BYTES)
            verified_skops(name, number, payload, offered["sha256"])
            return FetchedModel(name=name, version=number, sha256=sha256, payload=payload, manifest=manifest,
                                skops_trusted_types=tuple(offered["trusted_types"]))
        payload = self._artifact(name, number, artifact_uri, MODEL_ARTIFACT, limit=MAX_MODEL_BYTES)
        sha256 = verified_sha256(name, number, payload, pinned=pin.sha256, tagged=tags[MODEL_HASH_TAG])
        return FetchedModel(name=name, version=number, sha256=sha256, payload=payload, manifest=manifest)

    def _artifact(self, name: str, version: str, artifact_uri: str, artifact: str,
                  limit: int = MAX_MLFLOW_ANSWER_BYTES) -> bytes:
        try:
            return self._get(self._artifact_download_path(artifact_uri, artifact), limit=limit)
        except ModelRefused as refusal:
            raise ModelRefused(f"refusing model {name} v{version}: {artifact}: {refusal}") from None

    def _signed_version(self, pin: ModelPin) -> dict:
        """The pinned version, or for `latest` the newest version signed by a trusted key: a writer who registers
        an unsigned version in dev gets it skipped, not the replicas crash-looping."""
        if pin.version != "latest":
            version = self._get_json("/api/2.0/mlflow/model-versions/get", name=pin.name,
                                     version=pin.version)["model_version"]
            check_signature(pin.name, version["version"], version_tags(version), self.trusted)
            return version
        versions = self._get_json("/api/2.0/mlflow/model-versions/search", filter=f"name='{pin.name}'",
                                  max_results="10000").get("model_versions", [])
        if not versions:
            raise ModelRefused(f"model {pin.name} has no registered version yet")
        for version in sorted(versions, key=lambda version: int(version["version"]), reverse=True):
            try:
                check_signature(pin.name, version["version"], version_tags(version), self.trusted)
            except ModelRefused as refusal:
                log.warning("not serving the newer version: %s", refusal)
                continue
            return version
        raise ModelRefused(f"refusing model {pin.name} latest: none of its {len(versions)} versions is signed by a "
                           f"key in {SIGNING_KEYS_VARIABLE}")

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
                                            timeout=self.timeout_s, context=self.tls) as response:
                    return capped_read(response, limit, f"{self.base}{path.split('?')[0]}")
            except urllib.error.HTTPError as error:
                if error.code < 500:
                    raise ModelRefused(f"model registry refused {path.split('?')[0]}: HTTP {error.code} "
                                       f"{_mlflow_message(error)}") from None
                reason = f"HTTP {error.code}"
            except (urllib.error.URLError, OSError) as error:
                if isinstance(getattr(error, "reason", error), ssl.SSLCertVerificationError):
                    raise ModelRefused(f"model registry {self.base} is not the stage's: its certificate does not "
                                       f"verify with {CA_CERTIFICATE_VARIABLE} ({getattr(error, 'reason', error)})"
                                       ) from None
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


def version_tags(version: Mapping[str, Any]) -> dict[str, str]:
    return {tag["key"]: tag["value"] for tag in version.get("tags", [])}


def check_signature(name: str, version: str, tags: Mapping[str, str], trusted: Sequence[Ed25519PublicKey]) -> None:
    """ModelRefused unless the version's tags carry both hashes and a signature of them, for this model's name,
    that one of the `trusted` keys verifies."""
    missing = [tag for tag in (MODEL_HASH_TAG, MANIFEST_HASH_TAG, SIGNATURE_TAG) if not tags.get(tag)]
    if missing:
        raise ModelRefused(f"refusing model {name} v{version}: the version has no {' or '.join(missing)} tag; only "
                           "versions `mlops train` signed are served")
    try:
        signature = base64.b64decode(tags[SIGNATURE_TAG], validate=True)
    except binascii.Error:
        raise ModelRefused(f"refusing model {name} v{version}: its {SIGNATURE_TAG} tag is not base64") from None
    message = signed_message(name, tags[MODEL_HASH_TAG], tags[MANIFEST_HASH_TAG])
    if not any(_verifies(key, signature, message) for key in trusted):
        raise ModelRefused(f"refusing model {name} v{version}: its signature verifies with none of the "
                           f"{len(trusted)} keys in {SIGNING_KEYS_VARIABLE}")


def _verifies(key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


def verified_manifest(name: str, version: str, manifest: bytes, *, signed: str, model_sha256: str) -> dict:
    """The run's manifest.json (the schema, drift's reference profile) when its bytes hash to the signed tag and it
    describes the signed model."""
    actual = hashlib.sha256(manifest).hexdigest()
    if actual != signed:
        raise ModelRefused(f"refusing model {name} v{version}: {MANIFEST_ARTIFACT} has sha256 {actual}, not the "
                           f"signed {MANIFEST_HASH_TAG} tag {signed}")
    try:
        described = json.loads(manifest)
    except ValueError:
        described = None
    outputs = described.get("outputs") if isinstance(described, dict) else None
    if not isinstance(outputs, dict) or outputs.get("model_sha256") != model_sha256:
        raise ModelRefused(f"refusing model {name} v{version}: {MANIFEST_ARTIFACT} does not describe the model "
                           f"of sha256 {model_sha256}")
    return described


def verified_sha256(name: str, version: str, payload: bytes, *, pinned: str, tagged: str) -> str:
    """The payload's sha256 when it matches the pin (when there is one) and the signed sha256 tag: unpickling runs
    code, so only the bytes the signature vouches for are ever loaded."""
    actual = checked_pin(name, version, hashlib.sha256(payload).hexdigest(), pinned=pinned)
    if actual != tagged:
        raise ModelRefused(f"refusing model {name} v{version}: sha256 {actual} does not match "
                           f"the registry's signed sha256 tag {tagged}")
    return actual


def checked_pin(name: str, version: str, sha256: str, *, pinned: str) -> str:
    if pinned and sha256 != pinned:
        raise ModelRefused(f"refusing model {name} v{version}: sha256 {sha256} does not match pinned {pinned}")
    return sha256


def skops_offer(name: str, version: str, manifest: dict) -> dict | None:
    """The signed manifest's description of model.skops ({"sha256", "trusted_types"}), or None where the model's
    project did not ask for skops."""
    offered = manifest["outputs"].get(SKOPS_OUTPUT)
    if offered is None:
        return None
    types = offered.get("trusted_types") if isinstance(offered, dict) else None
    if (not isinstance(offered, dict) or not re.fullmatch(r"[0-9a-f]{64}", str(offered.get("sha256")))
            or not isinstance(types, list) or not all(isinstance(entry, str) for entry in types)):
        raise ModelRefused(f"refusing model {name} v{version}: {MANIFEST_ARTIFACT}'s outputs.{SKOPS_OUTPUT} is not "
                           "{sha256, trusted_types}")
    return offered


def verified_skops(name: str, version: str, payload: bytes, signed: str) -> None:
    actual = hashlib.sha256(payload).hexdigest()
    if actual != signed:
        raise ModelRefused(f"refusing model {name} v{version}: {SKOPS_ARTIFACT} has sha256 {actual}, not the "
                           f"{signed} the signed manifest gives it")


def _mlflow_message(error: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(error.read())
    except ValueError:
        return ""
    return f"({body.get('error_code', '')}: {body.get('message', '')})"
