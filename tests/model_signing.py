"""Model versions signed as `mlops train` signs them, for the tests that stand in for MLflow: a key pair of the
test's own, and the files and tags of a version it signed."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mlops import signing
from mlops_spec.contract import MANIFEST_HASH_TAG, MODEL_HASH_TAG, SIGNATURE_TAG


def manifest_of(payload: bytes, *, skops: dict | None = None, **fields: object) -> bytes:
    """A manifest.json that describes `payload` (and its `skops` form, where given), and carries `fields`, as a
    training run writes it."""
    outputs = {"model_sha256": hashlib.sha256(payload).hexdigest(), **({"skops": skops} if skops else {})}
    return json.dumps({"outputs": outputs, **fields}).encode()


@dataclass
class ModelSigner:
    key: Ed25519PrivateKey = field(default_factory=Ed25519PrivateKey.generate)

    @property
    def public_pem(self) -> str:
        """What a replica's MODEL_SIGNING_KEYS holds."""
        return signing.public_pem(self.key)

    @property
    def trusted(self) -> list[Ed25519PublicKey]:
        return [self.key.public_key()]

    def tags(self, model: str, payload: bytes, manifest: bytes) -> dict[str, str]:
        """The tags of a version of `model` whose files are `payload` and `manifest`, signed by this key."""
        model_sha256, manifest_sha256 = hashlib.sha256(payload).hexdigest(), hashlib.sha256(manifest).hexdigest()
        return {MODEL_HASH_TAG: model_sha256, MANIFEST_HASH_TAG: manifest_sha256,
                SIGNATURE_TAG: signing.signature(self.key, model, model_sha256, manifest_sha256)}


SESSION_SIGNER = ModelSigner()
"""The test session's training stage: every stage a test deploys trusts its key (tests/engine.py), and `mlops train`
signs with it there, as CI hands a stage's key over."""
SIGNING_KEY_PEM = signing.private_pem(SESSION_SIGNER.key)
TRUSTED_KEYS_PEM = SESSION_SIGNER.public_pem
