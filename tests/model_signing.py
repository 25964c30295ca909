"""The test session's model signing key, as one training stage's: every stage a test deploys trusts its public half,
and versions a test registers itself are signed with it as `mlops train` signs them (mlops/signing.py)."""
from __future__ import annotations

import hashlib

from mlops.signing import new_signing_key, private_pem, public_pem, signature
from mlops_spec.contract import MANIFEST_HASH_TAG, MODEL_HASH_TAG, SIGNATURE_TAG

SIGNING_KEY = new_signing_key()
SIGNING_KEY_PEM = private_pem(SIGNING_KEY)
TRUSTED_KEYS_PEM = public_pem(SIGNING_KEY)


def signed_tags(model: str, files: dict[str, bytes], key=SIGNING_KEY) -> dict[str, str]:
    """The hash and signature tags of a version of `model` with these `model.pkl` and `manifest.json`."""
    hashes = {MODEL_HASH_TAG: hashlib.sha256(files["model.pkl"]).hexdigest(),
              MANIFEST_HASH_TAG: hashlib.sha256(files["manifest.json"]).hexdigest()}
    return {**hashes, SIGNATURE_TAG: signature(key, model, hashes[MODEL_HASH_TAG], hashes[MANIFEST_HASH_TAG])}
