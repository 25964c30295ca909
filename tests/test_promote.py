"""`mlops promote` against two real MLflow tracking servers (the source and the target stage's registry).

The servers (tests/mlflow_servers.py) start as the MLflow image starts them: with the basic-auth app and the
stage's identities, each server with a secret of its own, so promotion logs in as `promoter` on both sides.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import bcrypt
import pytest
from ruamel.yaml import YAML
from typer.testing import CliRunner

from components.images import BuildSettings, model_image_name, model_image_repository
from components.workload import HttpHealth, http_probe
from mlops import promote, rollout
from mlops.cli import app
from mlops.imagecopy import RegistryError, StageRegistry, manifest_digest, read_manifest
from mlops.modelstore import MODEL_FILES, BasicAuth, MlflowStore, ModelVersion, StoreError
from mlops.signing import check_signed, public_keys
from mlops_spec.contract import (
    IMAGE_REGISTRY_PORT,
    MLFLOW_PASSWORD,
    PROMOTER,
    READER,
    REGISTRY_PASSWORD,
    SIGNATURE_TAG,
    TRAINER,
    TRUSTED_MODEL_KEYS,
    derived_password,
    release_id,
    secret_variable,
)
from mlops_spec.loading import load_stage
from mlops_spec.models import HealthCheck, ModelPin
from mlops_spec.project import ENVIRONMENTS_DIR, REPO_ROOT
from mlops_spec.service_tls import ServerTls, server_tls
from tests.conftest import (
    FIXTURE_SERVING_DIGEST,
    FIXTURE_TRAINING_DIGEST,
    REQUIRE_DOCKER,
    free_port,
    pinned_image,
)
from tests.mlflow_servers import MLFLOW_SECRETS
from tests.model_signing import SESSION_SIGNER, TRUSTED_KEYS_PEM, ModelSigner, manifest_of

MODEL_NAME = "iris-classifier"
OTHER_MODEL = "diabetes-regressor"
MODELS = (MODEL_NAME, OTHER_MODEL)
ROLE_DIGESTS = {"training": FIXTURE_TRAINING_DIGEST, "serving": FIXTURE_SERVING_DIGEST}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def commit(environments: Path, message: str) -> None:
    git(environments.parent, "add", "environments")
    git(environments.parent, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", message)


def model_image(stage: str, model: str, role: str, digest: str | None = None) -> str:
    """A model's image as a promoted stage pins it: `localhost:<own port>/<stage>/<model>-<role>@sha256:…`."""
    return pinned_image(stage, f"{model}-{role}", digest or ROLE_DIGESTS[role])


def release_yaml(version: int, sha256: str, model: str = MODEL_NAME, stage: str = "staging") -> str:
    """`models.<model>.release` of `stage`, its images pinned in the stage's own registry: the lines that go under
    `  <model>:` of the stage file."""
    return (f"    release:\n      version: {version}\n      sha256: {sha256}\n      images:\n"
            f"        training: {model_image(stage, model, 'training')}\n"
            f"        serving: {model_image(stage, model, 'serving')}\n")


def under_model(text: str, lines: dict[str, str]) -> str:
    """A stage file's `text` with `lines[model]` first under each `  <model>:` of its `models` block."""
    for model, added in lines.items():
        assert text.count(f"\n  {model}:\n") == 1, model
        text = text.replace(f"\n  {model}:\n", f"\n  {model}:\n{added}")
    return text


def make_repo(tmp_path: Path, *, staging_port: int = 5100, prod_port: int = 5200,
              releases: dict[str, str] | None = None, staging_image_port: int = 5101) -> Path:
    """A git repo whose committed environments/ has staging's model registry on `staging_port`, its image registry
    on `staging_image_port`, and `releases` (model -> release_yaml) under staging's models; prod's model registry
    on `prod_port`."""
    environments = tmp_path / "repo" / "environments"
    shutil.copytree(ENVIRONMENTS_DIR, environments)
    staging, prod = environments / "staging.yaml", environments / "prod.yaml"
    staging.write_text(under_model(staging.read_text().replace("host_port: 5100", f"host_port: {staging_port}")
                                   .replace("host_port: 5101", f"host_port: {staging_image_port}"), releases or {}))
    prod.write_text(prod.read_text().replace("host_port: 5200", f"host_port: {prod_port}"))
    git(environments.parent, "init", "-q", "-b", "main")
    commit(environments, "stages")
    return environments


class FakeImageRegistries:
    """Stands in for skopeo in the tests about the model and the spec edit: which registry (by address)
    holds which repository at which digest. The real copies are tested against real registries below."""

    def __init__(self) -> None:
        self.images: set[tuple[str, str, str]] = set()
        self.copies: list[tuple[str, str, str]] = []

    def manifest_digest(self, registry: StageRegistry, repository: str, reference: str) -> str:
        if (registry.address, repository, reference) not in self.images:
            raise RegistryError(f"{repository}@{reference}: {registry.where} at {registry.address} does not have it")
        return reference

    def copy_image(self, source: StageRegistry, repository: str, digest: str, target: StageRegistry,
                   target_repository: str) -> str:
        self.manifest_digest(source, repository, digest)
        self.images.add((target.address, target_repository, digest))
        self.copies.append((target.address, target_repository, digest))
        return f"{target_repository}@{digest}"


def store(registries: dict[str, int], role: str, identity: str = PROMOTER) -> MlflowStore:
    """The `role` server ("source" or "target") as MLflow user `identity` there."""
    return MlflowStore(f"http://127.0.0.1:{registries[role]}",
                       BasicAuth(identity, derived_password(MLFLOW_SECRETS[role], identity)))


def mlflow_secrets_as(monkeypatch, **roles: str) -> None:
    """Give stage `stage` the MLflow secret of the server that plays it, as CI would (`staging="target"`)."""
    for stage, role in roles.items():
        monkeypatch.setenv(secret_variable(MLFLOW_PASSWORD, stage), MLFLOW_SECRETS[role])


def give_stage_secrets(monkeypatch) -> None:
    """dev and staging promote from the source server, into prod on the target server, unless a test says otherwise."""
    for stage in ("dev", "staging", "prod"):
        monkeypatch.setenv(secret_variable(REGISTRY_PASSWORD, stage), f"{stage}-password")
        monkeypatch.setenv(secret_variable(TRUSTED_MODEL_KEYS, stage), TRUSTED_KEYS_PEM)
    mlflow_secrets_as(monkeypatch, dev="source", staging="source", prod="target")


@pytest.fixture(autouse=True)
def stage_secrets(monkeypatch):
    give_stage_secrets(monkeypatch)


@pytest.fixture
def image_registries(monkeypatch):
    """Staging's registry (shipped port 5101) holds the images its releases pin, of both models."""
    fake = FakeImageRegistries()
    for model in MODELS:
        for role, digest in ROLE_DIGESTS.items():
            fake.images.add(("127.0.0.1:5101", f"staging/{model}-{role}", digest))
    monkeypatch.setattr(promote, "manifest_digest", fake.manifest_digest)
    monkeypatch.setattr(promote, "copy_image", fake.copy_image)
    return fake


def register_source_model(registries: dict[str, int], *, model: str = MODEL_NAME, files: dict[str, bytes] | None = None,
                          **metrics: float) -> tuple[int, str]:
    """Register a version of `model` in the source registry the way training does: files under model/, sha256 tag,
    metrics."""
    payload = os.urandom(64)  # a distinct model.pkl per test: the servers are shared by the whole session
    version = ModelVersion(name=model, version=0, files={"model.pkl": payload, "manifest.json": b'{"features": 4}'}
                           if files is None else files, metrics=metrics)
    tags = (SESSION_SIGNER.tags(model, version.files["model.pkl"], version.files["manifest.json"])
            if set(MODEL_FILES) <= set(version.files) else {"sha256": "e" * 64})
    return store(registries, "source", TRAINER).publish(version, tags), tags["sha256"]


def promote_cli(environments: Path, *args: str):
    return CliRunner().invoke(app, ["promote", "--from", "staging", "--to", "prod", "--environments", str(environments),
                                    *args], catch_exceptions=False)


@pytest.fixture
def promotable(tmp_path, registries, image_registries):
    """staging serves iris-classifier only, so promoting it needs no --model."""
    version, sha256 = register_source_model(registries, accuracy=0.97)
    environments = make_repo(tmp_path, staging_port=registries["source"], prod_port=registries["target"],
                             releases={MODEL_NAME: release_yaml(version, sha256)})
    return environments, sha256


def assert_refused(result, environments: Path, before: str, reason: str, code: int = 1) -> None:
    assert result.exit_code == code, result.output
    assert reason in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert (environments / "prod.yaml").read_text() == before
    assert sorted(p.name for p in environments.iterdir()) == sorted(p.name for p in ENVIRONMENTS_DIR.iterdir())


def test_promote_pins_the_models_release_keeps_comments_and_copies_the_model(promotable, registries,
                                                                              image_registries):
    environments, sha256 = promotable
    prod = environments / "prod.yaml"
    before = prod.read_text()
    target = store(registries, "target")
    expected_version = target.next_version(MODEL_NAME)

    result = promote_cli(environments)

    assert result.exit_code == 0, result.output
    after = prod.read_text()
    changes = [line for line in difflib.ndiff(before.splitlines(), after.splitlines()) if line[:1] in "+-?"]
    assert all(line.startswith("+ ") for line in changes), changes  # nothing removed or altered
    assert [line[2:] for line in changes] == [
        "    release:", f"      version: {expected_version}", f"      sha256: {sha256}", "      images:",
        f"        training: {model_image('prod', MODEL_NAME, 'training')}",
        f"        serving: {model_image('prod', MODEL_NAME, 'serving')}"]
    assert after.index(f"  {MODEL_NAME}:\n    release:\n") < after.index("gates: {min_metrics: {accuracy: 0.9}}")
    # Both images were copied into prod's own registry, into the model's repositories, under their digests.
    assert sorted(image_registries.copies) == [
        ("127.0.0.1:5201", f"prod/{MODEL_NAME}-serving", FIXTURE_SERVING_DIGEST),
        ("127.0.0.1:5201", f"prod/{MODEL_NAME}-training", FIXTURE_TRAINING_DIGEST)]
    assert list(YAML().load(after)) == list(YAML().load(before))
    assert "+    release:" in result.output
    assert result.output.splitlines()[-1].startswith(f"promoted {MODEL_NAME} v")

    spec = load_stage("prod", environments)
    release = spec.models[MODEL_NAME].release
    assert (release.version, release.sha256) == (expected_version, sha256)
    assert spec.models[OTHER_MODEL].release is None
    copied = target.fetch(MODEL_NAME, expected_version)
    assert copied.sha256 == sha256
    assert copied.metrics["accuracy"] == pytest.approx(0.97)
    assert copied.files["manifest.json"] == b'{"features": 4}'
    assert copied.tags["mlops.promoted_from"].startswith("staging v")
    check_signed(MODEL_NAME, expected_version, copied.tags, public_keys(TRUSTED_KEYS_PEM, "prod's"), "prod")


@pytest.mark.parametrize("how, refusal", [
    ("unsigned", "has no signature tag"),
    ("another key", "its signature verifies with none of the 1 keys prod's mlops:trustedModelKeys trusts"),
    ("another model's signature", "its signature verifies with none"),
    ("manifest changed", "manifest.json has sha256"),
])
def test_a_version_the_targets_keys_do_not_vouch_for_is_refused_before_anything_is_copied(
        tmp_path, registries, image_registries, how, refusal):
    payload, manifest = os.urandom(64), b'{"features": 4}'
    signed = SESSION_SIGNER.tags(MODEL_NAME, payload, manifest)
    tags = {"unsigned": {key: value for key, value in signed.items() if key != SIGNATURE_TAG},
            "another key": ModelSigner().tags(MODEL_NAME, payload, manifest),
            "another model's signature": {**signed,
                                          SIGNATURE_TAG: SESSION_SIGNER.tags(OTHER_MODEL, payload, manifest)[SIGNATURE_TAG]},
            "manifest changed": SESSION_SIGNER.tags(MODEL_NAME, payload, b'{"features": 5}')}[how]
    files = {"model.pkl": payload, "manifest.json": manifest}
    version = store(registries, "source", TRAINER).publish(
        ModelVersion(name=MODEL_NAME, version=0, files=files, metrics={"accuracy": 0.97}), tags)
    environments = make_repo(tmp_path, staging_port=registries["source"], prod_port=registries["target"],
                             releases={MODEL_NAME: release_yaml(version, tags["sha256"])})
    before = (environments / "prod.yaml").read_text()
    target_versions = store(registries, "target").next_version(MODEL_NAME)
    assert_refused(promote_cli(environments), environments, before, refusal)
    assert image_registries.copies == []
    assert store(registries, "target").next_version(MODEL_NAME) == target_versions


@pytest.fixture
def both_models(tmp_path, registries, image_registries):
    """staging serves both models; prod serves both too: iris-classifier v1 and the regressor, whose pins are
    written on one line with a comment."""
    pins = {model: register_source_model(registries, model=model, accuracy=0.97, r2=0.5) for model in MODELS}
    environments = make_repo(tmp_path, staging_port=registries["source"], prod_port=registries["target"],
                             releases={model: release_yaml(*pins[model], model=model) for model in MODELS})
    other = (f"    release: {{version: 2, sha256: {'d' * 64}, images: {{training: "
             f"{model_image('prod', OTHER_MODEL, 'training')}, serving: {model_image('prod', OTHER_MODEL, 'serving')}}}}}"
             "   # promoted by hand, in review\n")
    old_iris = release_yaml(1, "c" * 64, stage="prod").replace(FIXTURE_SERVING_DIGEST, "sha256:" + "9" * 64)
    prod = environments / "prod.yaml"
    prod.write_text(under_model(prod.read_text(), {MODEL_NAME: old_iris, OTHER_MODEL: other}))
    commit(environments, "prod serves both models")
    return environments, pins, old_iris


def test_promoting_one_model_leaves_every_other_line_byte_identical(both_models, registries, image_registries):
    environments, pins, old_iris = both_models
    prod = environments / "prod.yaml"
    before = prod.read_text()
    other_before = load_stage("prod", environments).models[OTHER_MODEL]
    expected_version = store(registries, "target").next_version(MODEL_NAME)

    result = promote_cli(environments, "--model", MODEL_NAME)

    assert result.exit_code == 0, result.output
    sha256 = pins[MODEL_NAME][1]
    # The one change is the promoted model's release: the regressor's pins, their style and comment, stay.
    assert prod.read_text() == before.replace(old_iris, release_yaml(expected_version, sha256, stage="prod"))
    assert load_stage("prod", environments).models[OTHER_MODEL] == other_before
    assert {repository for _, repository, _ in image_registries.copies} == {f"prod/{MODEL_NAME}-training",
                                                                          f"prod/{MODEL_NAME}-serving"}
    assert store(registries, "target").find_version(OTHER_MODEL, pins[OTHER_MODEL][1]) is None
    assert f"promoted {MODEL_NAME} v{pins[MODEL_NAME][0]} of staging as v{expected_version} of prod" in result.output


def test_the_model_must_be_named_where_the_source_serves_several(tmp_path):
    # Checked before any registry is asked: no server is needed to refuse.
    environments = make_repo(tmp_path, releases={model: release_yaml(1, "a" * 64, model=model) for model in MODELS})
    before = (environments / "prod.yaml").read_text()
    result = promote_cli(environments)
    assert_refused(result, environments, before, f"refused: staging serves {OTHER_MODEL}, {MODEL_NAME}: name the one "
                                                 "to promote with --model", code=2)


def test_a_model_the_target_does_not_declare_is_refused_naming_its_file(tmp_path):
    environments = make_repo(tmp_path, releases={MODEL_NAME: release_yaml(1, "a" * 64)})
    before = (environments / "prod.yaml").read_text()
    result = promote_cli(environments, "--model", "churn-predictor")
    assert_refused(result, environments, before, "prod.yaml (with base.yaml) declares no model 'churn-predictor' "
                                                 f"under models:, only {OTHER_MODEL}, {MODEL_NAME}; declare it there first")


def test_a_model_the_source_does_not_serve_is_refused(tmp_path):
    environments = make_repo(tmp_path, releases={MODEL_NAME: release_yaml(1, "a" * 64)})
    before = (environments / "prod.yaml").read_text()
    assert_refused(promote_cli(environments, "--model", OTHER_MODEL), environments, before,
                   f"staging has no release of {OTHER_MODEL} to promote: it does not serve that model")


def test_promoting_again_reuses_the_copied_version(promotable, registries):
    environments, _ = promotable
    assert promote_cli(environments).exit_code == 0
    git(environments.parent, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qam", "promote")
    target = store(registries, "target")
    versions_before = target.next_version(MODEL_NAME)
    pinned = (environments / "prod.yaml").read_text()

    assert promote_cli(environments).exit_code == 0
    assert target.next_version(MODEL_NAME) == versions_before
    assert (environments / "prod.yaml").read_text() == pinned


def test_dry_run_shows_the_diff_and_changes_nothing(promotable, registries, image_registries):
    environments, sha256 = promotable
    before = (environments / "prod.yaml").read_text()
    target = store(registries, "target")
    next_version = target.next_version(MODEL_NAME)

    result = promote_cli(environments, "--dry-run")

    assert result.exit_code == 0, result.output
    assert f"+      sha256: {sha256}" in result.output
    assert result.output.splitlines()[-1].startswith(f"dry run: would promote {MODEL_NAME} v")
    assert (environments / "prod.yaml").read_text() == before
    assert target.next_version(MODEL_NAME) == next_version
    assert target.find_version(MODEL_NAME, sha256) is None
    assert image_registries.copies == []


def test_image_missing_in_the_source_registry_is_refused_and_nothing_is_copied(promotable, registries,
                                                                               image_registries):
    environments, sha256 = promotable
    image_registries.images.discard(("127.0.0.1:5101", f"staging/{MODEL_NAME}-serving", FIXTURE_SERVING_DIGEST))
    before = (environments / "prod.yaml").read_text()
    result = promote_cli(environments)
    assert_refused(result, environments, before, f"staging/{MODEL_NAME}-serving@{FIXTURE_SERVING_DIGEST}: staging's "
                                                 "image registry (Docker host unix:///var/run/docker.sock) at "
                                                 "127.0.0.1:5101 does not have it")
    assert image_registries.copies == []
    assert store(registries, "target").find_version(MODEL_NAME, sha256) is None


@pytest.fixture
def no_pulumi_cli(monkeypatch, tmp_path):
    """A PATH with git and nothing else: no Pulumi CLI to read a stack's secret from."""
    only_git = tmp_path / "bin"
    only_git.mkdir()
    (only_git / "git").symlink_to(shutil.which("git"))
    monkeypatch.setenv("PATH", str(only_git))


def test_missing_registry_password_is_one_clear_line(promotable, monkeypatch, no_pulumi_cli):
    environments, _ = promotable
    monkeypatch.delenv("MLOPS_REGISTRY_PASSWORD_PROD")
    before = (environments / "prod.yaml").read_text()
    assert_refused(promote_cli(environments), environments, before,
                   "no password for prod's image registry: set MLOPS_REGISTRY_PASSWORD_PROD")


def test_missing_mlflow_secret_is_one_clear_line(promotable, monkeypatch, no_pulumi_cli):
    environments, _ = promotable
    monkeypatch.delenv("MLOPS_MLFLOW_PASSWORD_PROD")
    before = (environments / "prod.yaml").read_text()
    assert_refused(promote_cli(environments), environments, before, "no password for prod's MLflow: set "
                   "MLOPS_MLFLOW_PASSWORD_PROD, or run where the Pulumi CLI reads stack prod's secret mlops:mlflowPassword")


def test_a_wrong_mlflow_secret_is_refused_by_the_registry_and_changes_nothing(promotable, registries, monkeypatch):
    environments, sha256 = promotable
    monkeypatch.setenv("MLOPS_MLFLOW_PASSWORD_PROD", "not-the-secret")
    before = (environments / "prod.yaml").read_text()
    assert_refused(promote_cli(environments), environments, before, "refused GET /api/2.0/mlflow/registered-models/get "
                   "to user promoter (HTTP 401); check the stage's Pulumi config secret mlops:mlflowPassword")
    assert store(registries, "target").find_version(MODEL_NAME, sha256) is None


def test_the_reader_cannot_publish_a_model(registries):
    model = ModelVersion(name=MODEL_NAME, version=0, files={"model.pkl": os.urandom(64), "manifest.json": b"{}"})
    store(registries, "target").publish(model, {"sha256": model.sha256})  # the promotions experiment exists
    with pytest.raises(StoreError, match=r"refused POST /api/2.0/mlflow/runs/create to user reader \(HTTP 403\)"):
        store(registries, "target", READER).publish(model, {"sha256": model.sha256})


@pytest.mark.parametrize("model, metrics, miss", [
    (MODEL_NAME, {"accuracy": 0.6}, "accuracy 0.6 < 0.9"),
    (OTHER_MODEL, {"r2": 0.2}, "r2 0.2 < 0.35"),
    (OTHER_MODEL, {"accuracy": 0.99}, "r2 is not recorded (needs >= 0.35)"),
])
def test_a_miss_of_the_targets_gates_of_that_model_is_refused(tmp_path, registries, image_registries, model, metrics,
                                                               miss):
    version, sha256 = register_source_model(registries, model=model, **metrics)
    environments = make_repo(tmp_path, staging_port=registries["source"], prod_port=registries["target"],
                             releases={model: release_yaml(version, sha256, model=model)})
    before = (environments / "prod.yaml").read_text()
    result = promote_cli(environments, "--model", model)
    assert_refused(result, environments, before, f"model {model} v{version} misses prod's "
                                                 f"models.{model}.gates.min_metrics: {miss}")
    assert store(registries, "target").find_version(model, sha256) is None
    assert image_registries.copies == []


def test_missing_artifact_is_refused(tmp_path, registries, image_registries):
    version, _ = register_source_model(registries, accuracy=0.97, files={"manifest.json": b"{}"})
    environments = make_repo(tmp_path, staging_port=registries["source"], prod_port=registries["target"],
                             releases={MODEL_NAME: release_yaml(version, "e" * 64)})
    before = (environments / "prod.yaml").read_text()
    result = promote_cli(environments)
    assert_refused(result, environments, before, f"model {MODEL_NAME} v{version} has no artifact model/model.pkl")


def test_sha256_mismatch_is_refused(tmp_path, registries, image_registries):
    version, sha256 = register_source_model(registries, accuracy=0.97)
    wrong = "f" * 64
    environments = make_repo(tmp_path, staging_port=registries["source"], prod_port=registries["target"],
                             releases={MODEL_NAME: release_yaml(version, wrong)})
    before = (environments / "prod.yaml").read_text()
    result = promote_cli(environments)
    assert_refused(result, environments, before, f"has sha256 {sha256}, but staging's pin says {wrong}")


def skops_model_files(skops_bytes: bytes, described: bytes) -> dict[str, bytes]:
    """A model whose project asked for skops: its pickle, its skops form, and a manifest that describes `described`
    as that form."""
    payload = os.urandom(64)
    skops = {"sha256": hashlib.sha256(described).hexdigest(), "trusted_types": ["sklearn.tree._tree.Tree"]}
    return {"model.pkl": payload, "model.skops": skops_bytes, "manifest.json": manifest_of(payload, skops=skops)}


def test_a_skops_form_is_promoted_with_its_model(tmp_path, registries, image_registries):
    skops_bytes = os.urandom(32)
    version, sha256 = register_source_model(registries, accuracy=0.97,
                                            files=skops_model_files(skops_bytes, described=skops_bytes))
    environments = make_repo(tmp_path, staging_port=registries["source"], prod_port=registries["target"],
                             releases={MODEL_NAME: release_yaml(version, sha256)})
    result = promote_cli(environments)
    assert result.exit_code == 0, result.output
    promoted = load_stage("prod", environments).models[MODEL_NAME].release
    assert store(registries, "target").fetch(MODEL_NAME, promoted.version).files["model.skops"] == skops_bytes


def test_a_skops_form_other_than_its_manifest_describes_is_refused(tmp_path, registries, image_registries):
    skops_bytes = os.urandom(32)
    version, sha256 = register_source_model(registries, accuracy=0.97,
                                            files=skops_model_files(skops_bytes, described=b"other bytes"))
    environments = make_repo(tmp_path, staging_port=registries["source"], prod_port=registries["target"],
                             releases={MODEL_NAME: release_yaml(version, sha256)})
    before = (environments / "prod.yaml").read_text()
    result = promote_cli(environments)
    assert_refused(result, environments, before, f"{MODEL_NAME} v{version}: model.skops has sha256 "
                   f"{hashlib.sha256(skops_bytes).hexdigest()}, but its manifest says "
                   f"{hashlib.sha256(b'other bytes').hexdigest()}")
    assert image_registries.copies == []


def test_uncommitted_target_file_is_refused(tmp_path):
    # Checked before any registry is asked: no server is needed to refuse.
    environments = make_repo(tmp_path, releases={MODEL_NAME: release_yaml(1, "a" * 64)})
    prod = environments / "prod.yaml"
    prod.write_text(prod.read_text() + "# a reviewer's note, not committed yet\n")
    before = prod.read_text()
    result = promote_cli(environments)
    assert_refused(result, environments, before, "prod.yaml has uncommitted edits")


def test_nothing_to_promote_is_refused(tmp_path):
    environments = make_repo(tmp_path)
    before = (environments / "prod.yaml").read_text()
    assert_refused(promote_cli(environments), environments, before, "staging has no release to promote")


@pytest.mark.parametrize("interruption", [OSError("disk full"), KeyboardInterrupt()])
def test_interrupted_write_leaves_the_original_and_no_temporary_file(tmp_path, monkeypatch, interruption):
    file = tmp_path / "prod.yaml"
    file.write_text("serving:\n  replicas: 3   # kept\n")

    def interrupted_rename(source, destination):
        assert Path(source).read_text() == "new content\n"  # the new content was fully written first
        raise interruption

    monkeypatch.setattr(promote.os, "replace", interrupted_rename)
    with pytest.raises(type(interruption)):
        promote.write_atomically(file, "new content\n")
    assert file.read_text() == "serving:\n  replicas: 3   # kept\n"
    assert [p.name for p in tmp_path.iterdir()] == ["prod.yaml"]


def test_promote_killed_before_the_rename_leaves_the_original_intact(tmp_path):
    file = tmp_path / "prod.yaml"
    file.write_text("serving:\n  replicas: 3\n")
    script = ("import os, signal, sys\nfrom pathlib import Path\nfrom mlops import promote\n"
              "promote.os.replace = lambda *args: os.kill(os.getpid(), signal.SIGKILL)\n"
              "promote.write_atomically(Path(sys.argv[1]), 'serving:\\n  replicas: 4\\n')\n")
    killed = subprocess.run([sys.executable, "-c", script, str(file)], capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    assert file.read_text() == "serving:\n  replicas: 3\n"
    # SIGKILL allows no cleanup: what is left is a hidden, fully written file no stage lookup matches.
    leftovers = [p for p in tmp_path.iterdir() if p != file]
    assert all(p.name.startswith(".prod.yaml.") and p.suffix == ".tmp" for p in leftovers)
    assert [p.read_text() for p in leftovers] == ["serving:\n  replicas: 4\n"] * len(leftovers)
    assert list(tmp_path.glob("*.yaml")) == [file]


def test_updated_spec_that_does_not_validate_is_never_written(tmp_path):
    environments = make_repo(tmp_path)
    target = load_stage("prod", environments)
    broken = promote.pinned_text((environments / "prod.yaml").read_text(), MODEL_NAME, {
        "version": 1, "sha256": "a" * 64,
        "images": {"training": "training:latest", "serving": model_image("prod", MODEL_NAME, "serving")}})
    with pytest.raises(promote.PromotionRefused, match=f"models.{MODEL_NAME}.release.images.training: "
                                                       "'training:latest' is not pinned by digest"):
        promote.validate_updated(target, environments / "prod.yaml", broken)


PINS = {"version": 4, "sha256": "a" * 64, "images": {"training": "t@sha256:" + "1" * 64,
                                                     "serving": "s@sha256:" + "2" * 64}}
PINNED_RELEASE = (f"    release:\n      version: 4\n      sha256: {'a' * 64}\n      images:\n"
                  f"        training: t@sha256:{'1' * 64}\n        serving: s@sha256:{'2' * 64}\n")


@pytest.mark.parametrize("original, pinned", [
    # No models block: one goes last, after a blank line, as in the shipped stage files.
    ("kind: prod\nserving:\n  replicas: 3   # kept\n\nmonitoring:\n  port: {host_port: 9290}\n",
     "kind: prod\nserving:\n  replicas: 3   # kept\n\nmonitoring:\n  port: {host_port: 9290}\n\nmodels:\n"
     f"  {MODEL_NAME}:\n{PINNED_RELEASE}"),
    # The model declared on one line: its release goes first, in block style, its gates stay as written.
    (f"models:\n  {OTHER_MODEL}: {{}}   # not served here\n  {MODEL_NAME}: {{gates: {{min_metrics: {{accuracy: 0.9}}}}}}\n",
     f"models:\n  {OTHER_MODEL}: {{}}   # not served here\n  {MODEL_NAME}:\n{PINNED_RELEASE}"
     "    gates: {min_metrics: {accuracy: 0.9}}\n"),
    # Another model only: this one goes at the end of models.
    (f"models:\n  {OTHER_MODEL}:\n    release: {{version: 3}}\n",
     f"models:\n  {OTHER_MODEL}:\n    release: {{version: 3}}\n  {MODEL_NAME}:\n{PINNED_RELEASE}"),
])
def test_a_missing_models_block_model_or_release_is_created_where_it_reads_well(original, pinned):
    assert promote.pinned_text(original, MODEL_NAME, PINS) == pinned


BLUE_SHA256, GREEN_SHA256 = "b4" * 32, "a5" * 32  # hex with letters: all digits would read as a number
GREEN_IMAGE = model_image("prod", MODEL_NAME, "serving", "sha256:" + "6" * 64)
BLUE = release_yaml(4, BLUE_SHA256, stage="prod")
GREEN = (f"    traffic: {{blue: 95, green: 5}}\n    green:\n      version: 5\n      sha256: {GREEN_SHA256}\n"
         f"      serving_image: {GREEN_IMAGE}   # built from the same project\n"
         "      rollout: {steps: [10, 100], bake_time_s: 60, max_error_rate_increase: 0.01, max_p99_latency_ratio: 1.5}\n")
OTHER_BLUE_AND_GREEN = (release_yaml(2, "d" * 64, model=OTHER_MODEL, stage="prod")
                        + f"    traffic: {{blue: 50, green: 50}}\n    green: {{version: 3, sha256: {'e' * 64}}}\n")


@pytest.fixture
def prod_with_greens(tmp_path):
    """Committed specs where prod serves both models, each as blue and a green: iris-classifier's under a rollout
    policy."""
    environments = make_repo(tmp_path)
    prod = environments / "prod.yaml"
    prod.write_text(under_model(prod.read_text(), {MODEL_NAME: BLUE + GREEN, OTHER_MODEL: OTHER_BLUE_AND_GREEN}))
    commit(environments, "greens")
    return environments


def gateway_recorded(monkeypatch, state: dict | None) -> list[tuple[str, str]]:
    """The state prod's gateway answers; returns the (stack, model) pairs asked."""
    asked = []

    def recorded(spec, stack, model):
        asked.append((stack, model))
        return state
    monkeypatch.setattr(rollout, "gateway_state", recorded)
    return asked


def green_state(phase: str) -> dict:
    return {"green_release": release_id(ModelPin(name=MODEL_NAME, version=5, sha256=GREEN_SHA256)), "phase": phase,
            "step": 1, "green_weight": 100}


def promote_green(environments: Path, *args: str):
    return CliRunner().invoke(app, ["promote", "--to", "prod", "--green", "--environments", str(environments), *args],
                              catch_exceptions=False)


def test_a_finished_green_becomes_its_models_blue_and_the_other_model_stays(prod_with_greens, monkeypatch):
    asked = gateway_recorded(monkeypatch, green_state("finished"))
    prod = prod_with_greens / "prod.yaml"
    before = prod.read_text()

    result = promote_green(prod_with_greens, "--model", MODEL_NAME)

    assert result.exit_code == 0, result.output
    assert asked == [("prod", MODEL_NAME)]
    swapped = BLUE.replace("version: 4", "version: 5").replace(BLUE_SHA256, GREEN_SHA256).replace(
        model_image("prod", MODEL_NAME, "serving"), GREEN_IMAGE)
    # Green's pins as the release, the green slot and traffic split gone; the regressor's lines as they were.
    assert prod.read_text() == before.replace(BLUE + GREEN, swapped)
    model = load_stage("prod", prod_with_greens).models[MODEL_NAME]
    assert (model.release.version, model.release.sha256, model.release.images.serving) == (5, GREEN_SHA256, GREEN_IMAGE)
    assert model.green is None and (model.traffic.blue, model.traffic.green) == (100, 0)
    assert "-    green:" in result.output
    assert result.output.splitlines()[-1] == (f"promoted prod's green {MODEL_NAME} v5 as its blue; commit prod.yaml "
                                              "and open a pull request")


@pytest.mark.parametrize("state, seen", [
    (green_state("rolled back"), f"rollout of {MODEL_NAME}:5:" + GREEN_SHA256 + " is rolled back"),
    (green_state("baking"), "is baking"),
    (None, "no rollout state"),
    ({**green_state("finished"), "green_release": f"{MODEL_NAME}:4:" + BLUE_SHA256}, f"rollout of {MODEL_NAME}:4:"),
])
def test_a_green_that_did_not_finish_its_rollout_is_refused(prod_with_greens, monkeypatch, state, seen):
    gateway_recorded(monkeypatch, state)
    before = (prod_with_greens / "prod.yaml").read_text()
    result = promote_green(prod_with_greens, "--model", MODEL_NAME)
    assert_refused(result, prod_with_greens, before, f"refused: prod's green {MODEL_NAME}:5:{GREEN_SHA256} has not "
                                                     "finished its rollout (")
    assert seen in result.output


def test_a_green_without_a_rollout_is_promoted_without_asking_the_gateway(prod_with_greens, monkeypatch):
    asked = gateway_recorded(monkeypatch, None)
    result = promote_green(prod_with_greens, "--model", OTHER_MODEL, "--dry-run")
    assert result.exit_code == 0, result.output
    assert asked == []
    assert result.output.splitlines()[-1] == (f"dry run: would promote prod's green {OTHER_MODEL} v3 as its blue; "
                                              "nothing written")
    assert f"+      sha256: {'e' * 64}" in result.output
    assert (prod_with_greens / "prod.yaml").read_text() == under_model(
        (ENVIRONMENTS_DIR / "prod.yaml").read_text(), {MODEL_NAME: BLUE + GREEN, OTHER_MODEL: OTHER_BLUE_AND_GREEN})


def test_green_needs_the_model_where_the_stage_serves_several(prod_with_greens, monkeypatch):
    gateway_recorded(monkeypatch, green_state("finished"))
    before = (prod_with_greens / "prod.yaml").read_text()
    assert_refused(promote_green(prod_with_greens), prod_with_greens, before,
                   f"refused: prod serves {OTHER_MODEL}, {MODEL_NAME}: name the one to promote with --model", code=2)


def test_green_of_a_model_without_one_is_refused(tmp_path, monkeypatch):
    environments = make_repo(tmp_path)
    prod = environments / "prod.yaml"
    prod.write_text(under_model(prod.read_text(), {MODEL_NAME: BLUE}))
    commit(environments, "iris in prod")
    before = prod.read_text()
    assert_refused(promote_green(environments), environments, before,
                   f"prod.yaml declares no models.{MODEL_NAME}.green and models.{MODEL_NAME}.release of its own to swap")


@pytest.mark.parametrize("args", [["--from", "staging", "--green"], []])
def test_either_from_or_green(prod_with_greens, args):
    result = CliRunner().invoke(app, ["promote", "--to", "prod", *args, "--environments", str(prod_with_greens)])
    assert (result.exit_code, result.output) == (2, "refused: give either --from STAGE or --green\n")


def dev_on(environments: Path, *, model_registry_port: int, image_registry_port: int | None = None) -> None:
    """Point dev's model registry at the test's server and commit it; with `image_registry_port`, give dev an image
    registry there (as a dev on a swarm has), else dev keeps its images on its engine as shipped."""
    dev = environments / "dev.yaml"
    shipped = "image_registry: {enabled: false}"
    text = dev.read_text()
    assert shipped in text
    if image_registry_port:
        text = text.replace(shipped, f"image_registry: {{enabled: true, port: {{host_port: {image_registry_port}}}}}")
    dev.write_text(text + f"\nmodel_registry:\n  port: {{host_port: {model_registry_port}}}\n")
    commit(environments, "dev ports")


def docker(*args: str, **kwargs) -> str:
    return subprocess.run(["docker", *args], check=True, capture_output=True, text=True, **kwargs).stdout.strip()


@pytest.fixture
def image_registry(docker_engine, tmp_path):
    """A factory: the project's image registry (images/registry) on a free port, with its own password and a
    private docker config logged in to it; returns (port, docker env, password)."""
    if subprocess.run(["docker", "image", "inspect", "mlops-base:bookworm"], capture_output=True).returncode != 0:
        reason = "the registry image builds on mlops-base:bookworm: run `make base-image`"
        if REQUIRE_DOCKER:
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    image = f"mlops-test-registry-{os.urandom(4).hex()}"
    docker("build", "-q", "-t", image, "--build-arg", "BASE_IMAGE=mlops-base:bookworm", str(REPO_ROOT / "images" / "registry"))
    started = []

    def start(tls: ServerTls | None = None) -> tuple[int, dict, str]:
        """`tls`: the certificate and key it speaks TLS with, as the stack hands them over off loopback."""
        name = f"{image}-{len(started)}"
        password = os.urandom(12).hex()
        entry = f"mlops:{bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode()}"
        port = free_port()
        tls_env = ["-e", "MLOPS_TLS_CERTIFICATE", "-e", "MLOPS_TLS_KEY"] if tls else []
        docker("run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:5000", "-e", f"REGISTRY_HTPASSWD_ENTRY={entry}",
               *tls_env, image, env={**os.environ, **({"MLOPS_TLS_CERTIFICATE": tls.certificate,
                                                        "MLOPS_TLS_KEY": tls.key} if tls else {})})
        started.append(name)
        config = {**os.environ, "DOCKER_CONFIG": str(tmp_path / f"docker-config-{name}")}
        deadline = time.monotonic() + 60
        while subprocess.run(["docker", "login", f"localhost:{port}", "-u", "mlops", "--password-stdin"], input=password,
                             capture_output=True, text=True, env=config).returncode != 0:
            assert time.monotonic() < deadline, docker("logs", name)
            time.sleep(1)
        return port, config, password

    try:
        yield start
    finally:
        for name in started:
            subprocess.run(["docker", "rm", "-f", name], capture_output=True)
        subprocess.run(["docker", "rmi", image], capture_output=True)


def build_stand_in(name: str, context: Path) -> str:
    """Build a small image as `name` on the local engine only; returns its image ID."""
    context.mkdir()
    (context / "marker").write_text(os.urandom(16).hex())
    (context / "Dockerfile").write_text("FROM scratch\nCOPY marker /marker\n")
    docker("build", "-q", "-t", name, str(context))
    return docker("image", "inspect", "--format", "{{.Id}}", name)


def push_stand_in(name: str, config: dict, context: Path) -> tuple[str, str]:
    """Build a small image as `name`, push it; returns the name and its registry digest reference."""
    build_stand_in(name, context)
    docker("push", "-q", name, env=config)
    repository = name.rsplit(":", 1)[0]
    digests = json.loads(docker("image", "inspect", "--format", "{{json .RepoDigests}}", name))
    return name, next(ref for ref in digests if ref.startswith(f"{repository}@sha256:"))


@pytest.fixture
def dev_and_staging(tmp_path, registries, image_registry, monkeypatch):
    """dev (model registry: the source MLflow, a real image registry holding stand-ins of its built images
    under their content tags) and staging (the target MLflow, a second real image registry)."""
    dev_port, dev_config, dev_password = image_registry()
    staging_port, _, staging_password = image_registry()
    monkeypatch.setenv("MLOPS_REGISTRY_PASSWORD_DEV", dev_password)
    monkeypatch.setenv("MLOPS_REGISTRY_PASSWORD_STAGING", staging_password)
    mlflow_secrets_as(monkeypatch, staging="target")
    version, sha256 = register_source_model(registries, accuracy=0.97)
    environments = make_repo(tmp_path, staging_port=registries["target"], prod_port=free_port(),
                             staging_image_port=staging_port)
    dev_on(environments, model_registry_port=registries["source"], image_registry_port=dev_port)
    dev = load_stage("dev", environments)
    pushed = {}
    for role, target in (("training", None), ("serving", dev.serving.runtime)):
        repository, tag = model_image_repository("dev", role, f"images/{role}", BuildSettings.of(dev), MODEL_NAME, target)
        pushed[role] = push_stand_in(f"localhost:{dev_port}/{repository}:{tag}", dev_config, tmp_path / role)
    yield environments, pushed, (version, sha256), staging_port, staging_password
    for name, _ in pushed.values():
        subprocess.run(["docker", "rmi", name], capture_output=True)


@pytest.mark.docker
def test_promote_from_dev_copies_the_images_into_staging_by_digest(dev_and_staging, registries):
    environments, pushed, (version, sha256), staging_port, staging_password = dev_and_staging
    result = CliRunner().invoke(app, ["promote", "--from", "dev", "--to", "staging", "--model", MODEL_NAME,
                                      "--environments", str(environments)])
    assert result.exit_code == 0, result.output
    staging = load_stage("staging", environments)
    release = staging.models[MODEL_NAME].release
    staging_registry = StageRegistry(where="staging's image registry", address=f"127.0.0.1:{staging_port}",
                                     username="mlops", password=staging_password)
    for role in ("training", "serving"):
        digest = pushed[role][1].split("@")[1]
        # Pinned in staging's own registry, under the digest dev pushed: the bytes were not rewritten.
        assert getattr(release.images, role) == f"localhost:{staging_port}/staging/{MODEL_NAME}-{role}@{digest}"
        assert manifest_digest(staging_registry, f"staging/{MODEL_NAME}-{role}", digest) == digest
    assert release.sha256 == sha256
    assert staging.models[OTHER_MODEL].release is None, "dev's other model stays where it is"
    copied = store(registries, "target").fetch(MODEL_NAME, release.version)
    assert copied.sha256 == sha256 and copied.tags["mlops.promoted_from"] == f"dev v{version}"


@pytest.mark.docker
def test_version_promotes_exactly_the_version_trained_though_a_newer_one_was_registered_since(dev_and_staging,
                                                                                              registries):
    """The retraining workflow promotes the version its run registered (`--version`), not the newest of a stage that
    follows `latest`: another run may have registered one in between."""
    environments, _, (trained, sha256), *_ = dev_and_staging
    newer, newer_sha256 = register_source_model(registries, accuracy=0.99)
    assert newer > trained and newer_sha256 != sha256
    result = CliRunner().invoke(app, ["promote", "--from", "dev", "--to", "staging", "--model", MODEL_NAME,
                                      "--version", str(trained), "--environments", str(environments)])
    assert result.exit_code == 0, result.output
    release = load_stage("staging", environments).models[MODEL_NAME].release
    assert release.sha256 == sha256
    copied = store(registries, "target").fetch(MODEL_NAME, release.version)
    assert copied.tags["mlops.promoted_from"] == f"dev v{trained}"


@pytest.mark.docker
def test_a_version_other_than_the_pinned_one_is_refused(promotable):
    environments, _ = promotable
    before = (environments / "prod.yaml").read_text()
    pinned = load_stage("staging", environments).models[MODEL_NAME].release.version
    result = promote_cli(environments, "--version", str(pinned + 1))
    assert_refused(result, environments, before, f"staging runs {MODEL_NAME} v{pinned}, not v{pinned + 1}: --version "
                                                 "names the version staging pins")


@pytest.mark.docker
def test_wrong_target_registry_password_is_one_line_and_changes_nothing(dev_and_staging, monkeypatch):
    environments, *_ = dev_and_staging
    monkeypatch.setenv("MLOPS_REGISTRY_PASSWORD_STAGING", "not-the-password")
    before = (environments / "staging.yaml").read_text()
    result = CliRunner().invoke(app, ["promote", "--from", "dev", "--to", "staging", "--model", MODEL_NAME,
                                      "--environments", str(environments)])
    assert result.exit_code == 1
    assert "staging's image registry (Docker host unix:///var/run/docker.sock)" in result.output
    assert "refused user mlops's credentials (401)" in result.output
    assert "staging.yaml is unchanged" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert (environments / "staging.yaml").read_text() == before


@pytest.mark.docker
def test_promote_from_dev_without_a_registry_takes_its_images_from_its_engine(tmp_path, registries, image_registry,
                                                                             monkeypatch):
    """dev as shipped pushes nowhere: promotion saves each image from dev's engine, compresses it once, shows the
    digest that staging's registry then serves, and pins exactly that; the image is the one dev built."""
    version, sha256 = register_source_model(registries, accuracy=0.97)
    staging_port, _, staging_password = image_registry()
    monkeypatch.setenv("MLOPS_REGISTRY_PASSWORD_STAGING", staging_password)
    mlflow_secrets_as(monkeypatch, staging="target")
    environments = make_repo(tmp_path, staging_port=registries["target"], prod_port=free_port(),
                             staging_image_port=staging_port)
    dev_on(environments, model_registry_port=registries["source"])
    dev = load_stage("dev", environments)
    assert not dev.image_registry.enabled
    built = {role: model_image_name("dev", role, f"images/{role}", BuildSettings.of(dev), MODEL_NAME, target=target)
             for role, target in (("training", None), ("serving", dev.serving.runtime))}
    image_ids = {role: build_stand_in(name, tmp_path / role) for role, name in built.items()}
    scratch_before = set(Path(tempfile.gettempdir()).glob("mlops-promote-*"))
    try:
        promote_args = ["promote", "--from", "dev", "--to", "staging", "--model", MODEL_NAME,
                        "--environments", str(environments)]
        before = (environments / "staging.yaml").read_text()
        shown = CliRunner().invoke(app, [*promote_args, "--dry-run"])
        assert shown.exit_code == 0, shown.output
        assert (environments / "staging.yaml").read_text() == before
        result = CliRunner().invoke(app, promote_args)
        assert result.exit_code == 0, result.output
    finally:
        for name in built.values():
            subprocess.run(["docker", "rmi", name], capture_output=True)
    release = load_stage("staging", environments).models[MODEL_NAME].release
    staging_registry = StageRegistry(where="staging's image registry", address=f"127.0.0.1:{staging_port}",
                                     username="mlops", password=staging_password)
    for role in ("training", "serving"):
        pin = getattr(release.images, role)
        repository, digest = pin.split("@")
        assert repository == f"localhost:{staging_port}/staging/{MODEL_NAME}-{role}"
        assert f"@{digest}" in shown.output, "the dry run shows the digest that is pinned"
        served = json.loads(read_manifest(staging_registry, f"staging/{MODEL_NAME}-{role}", digest))
        assert served["config"]["digest"] == image_ids[role], "the image dev's engine built, not another"
    assert release.sha256 == sha256
    assert store(registries, "target").fetch(MODEL_NAME, release.version).tags["mlops.promoted_from"] == f"dev v{version}"
    assert set(Path(tempfile.gettempdir()).glob("mlops-promote-*")) <= scratch_before, "the taken images are removed"


@pytest.mark.docker
@pytest.mark.parametrize("dev_has_a_registry", [True, False], ids=["in its registry", "on its engine"])
def test_dev_images_never_built_are_refused_in_one_line(dev_has_a_registry, tmp_path, registries, image_registry,
                                                        monkeypatch):
    """Nothing under the content tag of the build context as it is now: the promotion names the image and where it
    looked, and changes nothing."""
    register_source_model(registries, accuracy=0.97)
    staging_port, _, staging_password = image_registry()
    monkeypatch.setenv("MLOPS_REGISTRY_PASSWORD_STAGING", staging_password)
    environments = make_repo(tmp_path, staging_port=registries["target"], staging_image_port=staging_port)
    dev_port = None
    if dev_has_a_registry:
        dev_port, _, dev_password = image_registry()
        monkeypatch.setenv("MLOPS_REGISTRY_PASSWORD_DEV", dev_password)
    dev_on(environments, model_registry_port=registries["source"], image_registry_port=dev_port)
    before = (environments / "staging.yaml").read_text()
    result = CliRunner().invoke(app, ["promote", "--from", "dev", "--to", "staging", "--model", MODEL_NAME,
                                      "--environments", str(environments)])
    assert result.exit_code == 1
    host = "unix:///var/run/docker.sock"
    image, where, built_into = (
        (f"dev/{MODEL_NAME}-training:", f"dev's image registry (Docker host {host}) at 127.0.0.1:{dev_port}",
         "image registry") if dev_has_a_registry else
        (f"mlops-dev/{MODEL_NAME}-training:", f"dev's Docker engine ({host})", "Docker engine"))
    assert f"dev has no built training image {image}" in result.output
    assert f"{where} does not have it" in result.output
    assert f"run `pulumi up -s dev` so it is built into dev's {built_into}" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert (environments / "staging.yaml").read_text() == before


@pytest.mark.parametrize("stderr, reason", [
    ('copying blob sha256:0a401f: Patch "http://127.0.0.1:5101/v2/staging/x/blobs/uploads/": dial tcp 127.0.0.1:5101: '
     "connect: connection refused", "is unreachable"),
    ("reading manifest sha256:4019ab: unauthorized: authentication required", "refused user mlops's credentials (401)"),
    ("initializing source: received unexpected HTTP status: 401 Unauthorized", "refused user mlops's credentials (401)"),
    ('pinging container registry 10.0.0.10:5301: Get "https://10.0.0.10:5301/v2/": tls: failed to verify certificate: '
     "x509: certificate signed by unknown authority", "presented a certificate that does not verify with the CA"),
    ('pinging container registry 10.0.0.10:5301: Get "https://10.0.0.10:5301/v2/": http: server gave HTTP response '
     "to HTTPS client", "speaks plain HTTP, where the stage's registry speaks TLS"),
])
def test_skopeo_failures_are_told_apart_by_their_words_not_by_digits_inside_a_digest(stderr, reason):
    from mlops.imagecopy import _reason

    registry = StageRegistry(where="staging's image registry", address="127.0.0.1:5101", username="mlops", password="p")
    assert reason in _reason(stderr, registry)


def test_skopeo_verifies_a_registry_published_off_loopback_with_its_stages_ca_alone(tmp_path, monkeypatch):
    from mlops import imagecopy

    asked, trusted = [], []

    def skopeo(command, **_options):
        asked.append(command)
        folders = {command[index + 1] for index, argument in enumerate(command) if argument.endswith("cert-dir")}
        trusted.append({folder: (Path(folder) / "ca.crt").read_text() for folder in folders})
        return subprocess.CompletedProcess(command, 0, stdout=json.dumps(trusted[-1]).encode(), stderr=b"")
    monkeypatch.setattr(imagecopy.subprocess, "run", skopeo)
    monkeypatch.setattr(imagecopy, "manifest_digest", lambda registry, repository, digest: digest)
    source = StageRegistry(where="dev's image registry", address="127.0.0.1:5001", username="mlops", password="p")
    target = StageRegistry(where="prod's image registry", address="10.0.0.10:5201", username="mlops", password="q",
                           ca_certificate="prod's CA")
    imagecopy.copy_image(source, "dev/m-serving", "sha256:" + "a" * 64, target, "prod/m-serving")
    [copy] = asked
    assert "--src-tls-verify=false" in copy, "a registry on loopback speaks plain HTTP"
    assert "--dest-tls-verify=true" in copy and "--dest-tls-verify=false" not in copy
    assert list(trusted[0].values()) == ["prod's CA"] and copy[copy.index("--dest-cert-dir") + 1] in trusted[0]
    asked.clear()
    assert json.loads(imagecopy._skopeo(["inspect", "--authfile", "a", *imagecopy._tls_options(target, str(tmp_path / "auth.json"))],
                                        target, "reading")) == {str(tmp_path / "certs"): "prod's CA"}
    assert "--tls-verify=true" in asked[0] and "--tls-verify=false" not in asked[0]


@pytest.mark.docker
def test_a_registry_speaking_tls_is_read_and_copied_only_with_its_stages_ca(image_registry, tmp_path):
    from mlops.imagecopy import copy_image

    tls = {stage: server_tls(f"{stage}-secret", stage, "image-registry", ("image-registry",)) for stage in ("dev", "prod")}
    (dev_port, dev_config, dev_password), (prod_port, _, prod_password) = image_registry(tls["dev"]), image_registry(tls["prod"])
    _, pushed = push_stand_in(f"localhost:{dev_port}/dev/stand-in:1", dev_config, tmp_path / "stand-in")
    digest = pushed.split("@")[1]
    dev = StageRegistry(where="dev's image registry", address=f"127.0.0.1:{dev_port}", username="mlops",
                        password=dev_password, ca_certificate=tls["dev"].ca_certificate)
    prod = StageRegistry(where="prod's image registry", address=f"127.0.0.1:{prod_port}", username="mlops",
                         password=prod_password, ca_certificate=tls["prod"].ca_certificate)
    assert copy_image(dev, "dev/stand-in", digest, prod, "prod/stand-in") == f"prod/stand-in@{digest}"
    assert manifest_digest(prod, "prod/stand-in", digest) == digest
    impostor = StageRegistry(**{**prod.__dict__, "ca_certificate": tls["dev"].ca_certificate})
    with pytest.raises(RegistryError, match="presented a certificate that does not verify with the CA"):
        read_manifest(impostor, "prod/stand-in", digest)
    with pytest.raises(RegistryError, match="presented a certificate that does not verify with the CA"):
        copy_image(dev, "dev/stand-in", digest, impostor, "prod/again")
    with pytest.raises(RegistryError, match="does not have it"):
        read_manifest(prod, "prod/again", digest)
    with pytest.raises(urllib.error.HTTPError) as plain:
        urllib.request.urlopen(f"http://127.0.0.1:{prod_port}/v2/", timeout=10)
    assert plain.value.code == 400, "TLS only: plain HTTP gets the TLS server's refusal"
    container = docker("ps", "-q", "--filter", f"publish={prod_port}")
    docker("exec", container, *http_probe(HttpHealth(IMAGE_REGISTRY_PORT, "/", HealthCheck(), tls=True))[1:])
    docker("rmi", pushed.split("@")[0] + ":1")
