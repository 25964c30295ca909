"""Model signatures as `mlops` makes and checks them (the tags and the signed message are mlops_spec.contract's).

`mlops train` signs each version it registers with its stage's private key (`mlops:modelSigningKey`), on the
machine that runs it: the key never enters a container, so neither MLflow, the team's training code nor a
replica can sign. `mlops promote` checks a version against the keys the target stage trusts
(`mlops:trustedModelKeys`) before it copies anything, and copies the signature with the version; the target's
replicas check it again before a byte reaches the unpickler (images/serving/serving/registry.py).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import replace
from typing import Mapping, Optional

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from mlops.modelstore import ModelStore, ModelVersion, skops_sha256
from mlops_spec.contract import MANIFEST_HASH_TAG, MODEL_HASH_TAG, SIGNATURE_TAG, SKOPS_FILE, signed_message

PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----", re.DOTALL)


class SigningError(Exception):
    """A key could not be read, or a version carries no signature a trusted key verifies; the message says which."""


def private_key(pem: str, where: str) -> Ed25519PrivateKey:
    """The Ed25519 private key in `pem` (`openssl genpkey -algorithm ed25519`); `where` names it in errors."""
    try:
        key = serialization.load_pem_private_key(pem.strip().encode(), password=None)
    except (ValueError, TypeError) as err:
        raise SigningError(f"{where} is not a PEM private key without a passphrase ({err})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{where} is a {type(key).__name__.removesuffix('PrivateKey').removeprefix('_')} key; "
                           "model signing keys are Ed25519 (openssl genpkey -algorithm ed25519)")
    return key


def public_keys(pem_text: str, where: str) -> list[Ed25519PublicKey]:
    """Every Ed25519 public key among the PEM blocks of `pem_text`; at least one."""
    blocks = [match.group(0) for match in PEM_BLOCK.finditer(pem_text)]
    if not blocks:
        raise SigningError(f"{where} holds no PEM public key (-----BEGIN PUBLIC KEY-----); "
                           "get one with `openssl pkey -pubout` from the signing stage's private key")
    keys = []
    for number, block in enumerate(blocks, start=1):
        try:
            key = serialization.load_pem_public_key(block.encode())
        except ValueError as err:
            raise SigningError(f"{where}: PEM block {number} is not a public key ({err})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise SigningError(f"{where}: PEM block {number} is not an Ed25519 public key")
        keys.append(key)
    return keys


def new_signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_pem(key: Ed25519PrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def public_pem(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def signature(key: Ed25519PrivateKey, model: str, model_sha256: str, manifest_sha256: str) -> str:
    """The SIGNATURE_TAG value for a version of `model` whose files hash as given."""
    return base64.b64encode(key.sign(signed_message(model, model_sha256, manifest_sha256))).decode()


def check_files(model: ModelVersion) -> None:
    """Raise SigningError unless the version's files, as downloaded, hash to what its tags say (and its skops form
    to what its manifest says): a signature vouches for the tags, these bytes must be what the tags name."""
    for file, tag in (("model.pkl", MODEL_HASH_TAG), ("manifest.json", MANIFEST_HASH_TAG)):
        actual = hashlib.sha256(model.files[file]).hexdigest()
        if model.tags.get(tag) != actual:
            raise SigningError(f"{model.name} v{model.version}: {file} has sha256 {actual}, but the version's {tag} "
                               f"tag says {model.tags.get(tag) or 'nothing'}")
    described = skops_sha256(model.files["manifest.json"])
    if described is not None:
        actual = hashlib.sha256(model.files.get(SKOPS_FILE, b"")).hexdigest()
        if actual != described:
            raise SigningError(f"{model.name} v{model.version}: {SKOPS_FILE} has sha256 {actual}, but its manifest "
                               f"says {described}")


def sign_version(store: ModelStore, name: str, version: int, key: Ed25519PrivateKey, *,
                 expected_sha256: Optional[str] = None, expected_by: str = "") -> bool:
    """Sign version `version` of `name` once its files in the store are what its tags and `expected_sha256` (when
    given: what `expected_by` says, e.g. the training run's report or a stage's pin) name, and its manifest describes
    that model, as a replica requires. A version registered before signing existed gets its `manifest_sha256` tag
    here. False when `key` signed it already; a signature by another key is never replaced (the tag is write-once)."""
    model = store.fetch(name, version)
    sha256 = model.tags.get(MODEL_HASH_TAG)
    if not sha256:
        raise SigningError(f"{name} v{version} is tagged sha256 nothing: not signing it")
    if expected_sha256 and sha256 != expected_sha256:
        raise SigningError(f"{name} v{version} is tagged sha256 {sha256}, but {expected_by} {expected_sha256}: "
                           "not signing it")
    manifest_sha256 = hashlib.sha256(model.files["manifest.json"]).hexdigest()
    tags = {MANIFEST_HASH_TAG: manifest_sha256, **model.tags}
    check_files(replace(model, tags=tags))
    try:
        described = json.loads(model.files["manifest.json"]).get("outputs", {}).get("model_sha256")
    except (ValueError, AttributeError):
        described = None
    if described != sha256:
        raise SigningError(f"{name} v{version}: its manifest.json does not describe model sha256 {sha256}, "
                           "so no replica would load it: not signing it")
    if SIGNATURE_TAG in tags:
        check_signed(name, version, tags, [key.public_key()], "the signing stage")
        return False
    if MANIFEST_HASH_TAG not in model.tags:
        store.set_version_tag(name, version, MANIFEST_HASH_TAG, manifest_sha256)
    store.set_version_tag(name, version, SIGNATURE_TAG, signature(key, name, sha256, manifest_sha256))
    return True


def check_signed(model: str, version: int, tags: Mapping[str, str], trusted: list[Ed25519PublicKey],
                 trusted_by: str) -> None:
    """Raise SigningError unless the version's tags carry both hashes and a signature of them that one of the
    `trusted` keys verifies; `trusted_by` names whose keys they are."""
    missing = [tag for tag in (MODEL_HASH_TAG, MANIFEST_HASH_TAG, SIGNATURE_TAG) if not tags.get(tag)]
    if missing:
        raise SigningError(f"{model} v{version} has no {' or '.join(missing)} tag: only versions `mlops train` "
                           "signed are served or promoted (one registered before models were signed: `mlops sign` it)")
    try:
        raw = base64.b64decode(tags[SIGNATURE_TAG], validate=True)
    except binascii.Error:
        raw = b""
    message = signed_message(model, tags[MODEL_HASH_TAG], tags[MANIFEST_HASH_TAG])
    for key in trusted:
        try:
            key.verify(raw, message)
            return
        except InvalidSignature:
            continue
    raise SigningError(f"{model} v{version}: its signature verifies with none of the {len(trusted)} keys "
                       f"{trusted_by} trusts")
