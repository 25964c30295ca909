"""`mlops sign`: a version registered before models were signed, vouched for where it is, against real MLflow
servers (tests/mlflow_servers.py) started as the MLflow image starts them."""
from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from mlops.cli import app
from mlops.modelstore import ModelVersion
from mlops.signing import check_signed, public_keys
from mlops_spec.contract import (
    MANIFEST_HASH_TAG,
    MODEL_SIGNING_KEY,
    SIGNATURE_TAG,
    TRAINER,
    TRUSTED_MODEL_KEYS,
    secret_variable,
)
from tests.mlflow_servers import registries  # noqa: F401
from tests.model_signing import SIGNING_KEY_PEM, TRUSTED_KEYS_PEM, ModelSigner, manifest_of
from tests.test_promote import MODEL_NAME, make_repo, mlflow_secrets_as, release_yaml, store


def register_unsigned(registries: dict[str, int], manifest: bytes | None = None) -> tuple[int, str]:
    """A version of MODEL_NAME in staging's MLflow as training registered it before signing: a sha256 tag only."""
    payload = os.urandom(64)
    model = ModelVersion(name=MODEL_NAME, version=0, files={
        "model.pkl": payload, "manifest.json": manifest_of(payload) if manifest is None else manifest})
    return store(registries, "source", TRAINER).publish(model, {"sha256": model.sha256}), model.sha256


@pytest.fixture
def keys(monkeypatch):
    """dev signs for staging, which trusts dev's public key."""
    mlflow_secrets_as(monkeypatch, staging="source")
    monkeypatch.setenv(secret_variable(MODEL_SIGNING_KEY, "dev"), SIGNING_KEY_PEM)
    monkeypatch.setenv(secret_variable(TRUSTED_MODEL_KEYS, "staging"), TRUSTED_KEYS_PEM)


def sign(environments, version: int):
    return CliRunner().invoke(app, ["sign", "--stage", "staging", "--model", MODEL_NAME, "--version", str(version),
                                    "--environments", str(environments)], catch_exceptions=False)


def tags_of(registries: dict[str, int], version: int) -> dict[str, str]:
    return store(registries, "source").fetch(MODEL_NAME, version).tags


def test_a_pinned_version_from_before_signing_is_signed_where_it_is_once(tmp_path, registries, keys):
    version, sha256 = register_unsigned(registries)
    environments = make_repo(tmp_path, staging_port=registries["source"],
                             releases={MODEL_NAME: release_yaml(version, sha256)})
    signed = sign(environments, version)
    assert signed.exit_code == 0, signed.output
    assert signed.output.strip() == f"signed {MODEL_NAME} v{version} in staging with dev's key"
    tags = tags_of(registries, version)
    check_signed(MODEL_NAME, version, tags, public_keys(TRUSTED_KEYS_PEM, "staging's"), "staging")
    assert tags[MANIFEST_HASH_TAG]

    again = sign(environments, version)
    assert again.exit_code == 0, again.output
    assert again.output.strip() == f"{MODEL_NAME} v{version} in staging is already signed with dev's key; nothing changed"
    assert tags_of(registries, version) == tags


@pytest.mark.parametrize("case, refusal", [
    ("pin", "but staging's pin says " + "f" * 64 + ": not signing it"),
    ("manifest", "its manifest.json does not describe model sha256"),
    ("trust", "staging's mlops:trustedModelKeys does not hold dev's public key"),
])
def test_a_version_that_is_not_what_the_stage_expects_is_not_signed(tmp_path, registries, keys, monkeypatch, case,
                                                                   refusal):
    version, sha256 = register_unsigned(registries, manifest=b'{"outputs": {}}' if case == "manifest" else None)
    environments = make_repo(tmp_path, staging_port=registries["source"],
                             releases={MODEL_NAME: release_yaml(version, "f" * 64 if case == "pin" else sha256)})
    if case == "trust":
        monkeypatch.setenv(secret_variable(TRUSTED_MODEL_KEYS, "staging"), ModelSigner().public_pem)
    refused = sign(environments, version)
    assert refused.exit_code == 1
    assert refused.output.startswith("error: ") and refusal in refused.output, refused.output
    assert len(refused.output.strip().splitlines()) == 1
    assert SIGNATURE_TAG not in tags_of(registries, version)
