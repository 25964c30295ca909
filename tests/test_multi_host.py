"""Stages on their own Docker hosts: train in dev, promote dev -> staging -> prod, switch dev's host off,
and prod still deploys and serves the pinned model from the images in its own registry.

dev and prod each run on an inner Docker engine (tests/hosts.py), staging on this machine's engine. Every
stage is rendered by the real program (`tests/engine.py` creates what it declares) from a git repo of
its own `environments/`, and `mlops promote` reaches each stage as it would reach a remote host: dev and
prod over `tcp://` at their published addresses, staging on loopback. prod's engine answers over TLS only: the
program reaches it with the client material in prod's config secrets, `mlops` with the operator's certificates in
DOCKER_CERT_PATH; dev's is a plain-text engine, which a dev stage may declare `insecure`.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from sklearn.datasets import load_iris

from mlops.credentials import mlflow_login
from mlops.imagecopy import StageRegistry, manifest_digest, read_manifest
from mlops.modelstore import BasicAuth, MlflowStore, StoreError
from mlops_spec.contract import (
    MLFLOW_PASSWORD,
    MODEL_SIGNING_KEY,
    READER,
    REGISTRY_PASSWORD,
    TRUSTED_MODEL_KEYS,
    secret_variable,
)
from mlops_spec.loading import load_stage
from mlops_spec.models import ModelRelease
from mlops_spec.project import ENVIRONMENTS_DIR, REPO_ROOT
from mlops_spec.service_tls import ca_certificate
from tests.conftest import free_port
from tests.engine import StageOnEngine
from tests.model_signing import SIGNING_KEY_PEM, TRUSTED_KEYS_PEM
from tests.readback import differences

MODEL = "iris-classifier"
"""The model trained in dev and promoted to staging and prod."""

pytestmark = pytest.mark.docker

PUBLISHED = {"bind_address": "0.0.0.0", "public": True}



def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
                   check=True, capture_output=True)


def edit_stage(environments: Path, stage: str, changes: dict) -> None:
    file = environments / f"{stage}.yaml"
    data = yaml.safe_load(file.read_text()) or {}
    for key, value in changes.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    file.write_text(yaml.safe_dump(data, sort_keys=False))


def released(stage: str, environments: Path) -> ModelRelease:
    """MODEL's release as promoted into `stage`."""
    release = load_stage(stage, environments).models[MODEL].release
    assert release is not None, f"nothing of {MODEL} was promoted to {stage}"
    return release


def mlops(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlops", *args], capture_output=True, text=True, timeout=900,
                          cwd=REPO_ROOT, env=env)


def infer(url: str, model: str, rows) -> list:
    body = json.dumps({"inputs": [{"name": "input-0", "shape": list(rows.shape), "datatype": "FP64",
                                   "data": rows.ravel().tolist()}]}).encode()
    request = urllib.request.Request(f"{url}/v2/models/{model}/infer", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())["outputs"][0]["data"]


@pytest.fixture(scope="module")
def stages(docker_hosts, tmp_path_factory):
    """A git repo whose stages live on three engines, each with its own registry password; yields the
    environments folder, the hosts and the passwords, and removes everything afterwards."""
    hosts = {**docker_hosts("dev"), **docker_hosts("prod", tls=True)}
    environments = tmp_path_factory.mktemp("multi-host") / "repo" / "environments"
    shutil.copytree(ENVIRONMENTS_DIR, environments)
    edit_stage(environments, "dev", {
        "docker": {"url": hosts["dev"].url, "insecure": True},
        "model_registry": {"port": {"host_port": 5000, **PUBLISHED}},
        "serving": {"port": {"host_port": 8080, **PUBLISHED}}})
    # dev builds and serves the one model promoted here (dev.yaml serves both shipped models).
    dev = yaml.safe_load((environments / "dev.yaml").read_text())
    dev["models"] = {MODEL: dev["models"][MODEL]}
    (environments / "dev.yaml").write_text(yaml.safe_dump(dev, sort_keys=False))
    edit_stage(environments, "staging", {
        "model_registry": {"port": {"host_port": free_port()}},
        "image_registry": {"port": {"host_port": free_port()}},
        "serving": {"port": {"host_port": free_port()}}})
    edit_stage(environments, "prod", {
        "docker": {"url": hosts["prod"].url},
        "model_registry": {"port": {"host_port": 5200, **PUBLISHED}},
        "image_registry": {"port": {"host_port": 5201, **PUBLISHED}},
        "serving": {"port": {"host_port": 8280, **PUBLISHED}}})
    git(environments.parent, "init", "-q", "-b", "main")
    git(environments.parent, "add", "environments")
    git(environments.parent, "commit", "-q", "-m", "three hosts")
    # Each stage's two secrets, dev's signing key and the keys each stage trusts, as CI provides them to `mlops train`
    # and `mlops promote`.
    secrets = {**{secret_variable(key, stage): uuid.uuid4().hex
                  for stage in ("dev", "staging", "prod") for key in (REGISTRY_PASSWORD, MLFLOW_PASSWORD)},
               secret_variable(MODEL_SIGNING_KEY, "dev"): SIGNING_KEY_PEM,
               **{secret_variable(TRUSTED_MODEL_KEYS, stage): TRUSTED_KEYS_PEM for stage in ("dev", "staging", "prod")}}
    passwords = {stage: secrets[secret_variable(REGISTRY_PASSWORD, stage)] for stage in ("dev", "staging", "prod")}
    saved = {variable: os.environ.get(variable) for variable in secrets}
    os.environ.update(secrets)
    deployed: list[StageOnEngine] = []
    try:
        yield environments, hosts, passwords, deployed
    finally:
        for stage in deployed:
            if stage.spec.docker.is_local:
                stage.teardown()
        for host in hosts.values():
            host.start()
            host.reset()
        for variable, value in saved.items():
            os.environ.pop(variable, None)
            if value is not None:
                os.environ[variable] = value


def deploy(stages, stage: str, stack: str | None = None) -> StageOnEngine:
    environments, hosts, passwords, deployed = stages
    tls = hosts[stage].tls if stage in hosts else None
    on_engine = StageOnEngine(stack=stack or stage, spec=load_stage(stage, environments),
                              registry_password=passwords[stage],
                              mlflow_password=os.environ[secret_variable(MLFLOW_PASSWORD, stage)],
                              docker_tls=tls.stack_config() if tls else {})
    deployed.append(on_engine)
    on_engine.deploy()
    return on_engine


def promote(environments: Path, source: str, target: str) -> None:
    promoted = mlops("promote", "--from", source, "--to", target, "--model", MODEL, "--environments", str(environments))
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr
    git(environments.parent, "commit", "-qam", f"promote {source} -> {target}")


@pytest.fixture(scope="module")
def prod_without_dev(stages):
    """Train in dev, promote to staging and prod, switch dev's host off, then deploy prod."""
    environments, hosts, _, _ = stages
    deploy(stages, "dev")
    trained = mlops("train", "--stage", "dev", "--model", MODEL, "--subset", "0.5", "--environments", str(environments))
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert trained.stdout.strip().splitlines()[-1].startswith("REGISTERED ")

    # staging and prod start with their registries and nothing promoted, as shipped.
    deploy(stages, "staging", stack=f"t-staging-{uuid.uuid4().hex[:6]}")
    prod = deploy(stages, "prod")
    promote(environments, "dev", "staging")
    promote(environments, "staging", "prod")

    hosts["dev"].stop()
    prod.spec = load_stage("prod", environments)
    prod.deploy()
    return prod


def prods_registry(hosts, passwords) -> StageRegistry:
    """prod's image registry as mlops reaches it: published off loopback, so over TLS that prod's CA verifies."""
    return StageRegistry(where="prod's image registry", address=f"{hosts['prod'].ip}:5201", username="mlops",
                         password=passwords["prod"], ca_certificate=ca_certificate(passwords["prod"], "prod", "image-registry"))


def test_the_provider_would_read_the_promoted_prod_back_as_declared(prod_without_dev):
    """prod on its TLS host, deployed and then updated to the promoted pin: the next `pulumi up` changes nothing."""
    assert differences(prod_without_dev) == []


def test_promoted_stages_pin_the_same_digests_in_their_own_registries(stages, prod_without_dev):
    environments, hosts, passwords, _ = stages
    staging, prod = released("staging", environments), released("prod", environments)
    assert staging.sha256 == prod.sha256
    for role in ("training", "serving"):
        staging_pin, prod_pin = getattr(staging.images, role), getattr(prod.images, role)
        server = load_stage("staging", environments).image_registry_server
        assert staging_pin.startswith(f"{server}/staging/{MODEL}-{role}@sha256:")
        assert prod_pin.startswith(f"localhost:5201/prod/{MODEL}-{role}@sha256:")
        digest = prod_pin.split("@")[1]
        assert staging_pin.split("@")[1] == digest, "a copy by digest keeps the bytes, so the digest"
        assert manifest_digest(prods_registry(hosts, passwords), f"prod/{MODEL}-{role}", digest) == digest


def test_prod_serves_the_pinned_model_from_its_own_host_while_dev_is_down(stages, prod_without_dev):
    environments, hosts, _, _ = stages
    with pytest.raises(OSError):
        socket.create_connection((hosts["dev"].ip, 5000), timeout=3).close()
    pin = released("prod", environments)
    assert isinstance(pin.version, int)
    # Every serving replica runs the image prod pinned, pulled from prod's own registry.
    for index in range(3):
        replica = prod_without_dev.client.containers.get(f"prod-{MODEL}-blue-{index}")
        assert pin.images.serving in replica.image.attrs["RepoDigests"]
    login = mlflow_login(load_stage("prod", environments), READER)
    reader = BasicAuth(READER, login.password)
    # Published off loopback, prod's MLflow speaks TLS, which its replicas verified with prod's CA to fetch this.
    assert login.ca_certificate is not None
    model = MlflowStore(f"https://{hosts['prod'].ip}:5200", reader,
                        ca_certificate=login.ca_certificate).fetch(MODEL, pin.version)
    with pytest.raises(StoreError, match="not reachable"):
        MlflowStore(f"http://{hosts['prod'].ip}:5200", reader).fetch(MODEL, pin.version)
    assert model.sha256 == pin.sha256
    rows = load_iris().data[::7]
    served = infer(f"http://{hosts['prod'].ip}:8280", MODEL, rows)
    assert served == pickle.loads(model.files["model.pkl"]).predict(rows).tolist()


def test_a_tampered_image_in_prods_registry_is_refused_by_the_deploy(stages, prod_without_dev):
    environments, hosts, passwords, _ = stages
    pin = released("prod", environments).images.serving
    assert pin is not None
    digest = pin.split("@")[1]
    client = hosts["prod"].client
    manifest = json.loads(read_manifest(prods_registry(hosts, passwords), f"prod/{MODEL}-serving", digest))
    layer = manifest["layers"][-1]["digest"].removeprefix("sha256:")
    blob = f"/var/lib/registry/docker/registry/v2/blobs/sha256/{layer[:2]}/{layer}/data"
    # Overwritten in place: the registry serves a blob by its recorded length, so appended bytes never leave it.
    overwrite = f"f = open('{blob}', 'r+b'); f.seek(16); f.write(b'tampered'); f.close()"
    # As the registry's own user: root without capabilities may not write its files.
    tampered = client.containers.get("prod-image-registry").exec_run(["python3", "-c", overwrite], user="10001:10001")
    assert tampered.exit_code == 0, tampered.output
    # Nothing of prod stays on its host but the data volumes, so the next deploy pulls the image again.
    for container in client.containers.list(all=True, filters={"label": "mlops.stack=prod"}):
        container.remove(force=True)
    client.images.remove(pin, force=True)

    with pytest.raises(Exception) as refused:
        deploy(stages, "prod")
    message = str(refused.value)
    assert digest.removeprefix("sha256:")[:12] in message or "verif" in message or "digest" in message, message
    assert not [c for c in client.containers.list(all=True, filters={"label": "mlops.stack=prod"})
                if c.name.startswith("prod-serving-")], "no replica may run an image that failed verification"


def test_mlops_reads_prods_tls_engine_with_the_operators_certificates_only(stages, prod_without_dev, tmp_path):
    environments, hosts, _, _ = stages
    tls = hosts["prod"].tls
    assert tls is not None and hosts["prod"].url.endswith(":2376")
    operator = {name: value for name, value in os.environ.items() if not name.startswith("DOCKER_")}
    with_certificates = mlops("status", "prod", "--json", "--environments", str(environments),
                              env={**operator, "DOCKER_CERT_PATH": str(tls.folder)})
    assert json.loads(with_certificates.stdout)["engine_problem"] is None, with_certificates.stdout
    # No DOCKER_CERT_PATH and nothing in docker's default ~/.docker: the engine refuses the CLI.
    without = mlops("status", "prod", "--json", "--environments", str(environments),
                    env={**operator, "HOME": str(tmp_path)})
    assert "did not answer" in (json.loads(without.stdout)["engine_problem"] or ""), without.stdout
