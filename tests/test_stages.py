"""Stages are data: every file in environments/ but base.yaml is a stage, its file says its kind and where its
releases come from, and the rules follow the kind, whatever the stage is called."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlops.cli import app
from mlops.plan import render
from mlops_spec.contract import REGISTRY_PASSWORD, SECRET_FILES_SUFFIX, TRUSTED_MODEL_KEYS, secret_variable
from mlops_spec.errors import SpecError
from mlops_spec.loading import load_all_stages, load_stage, load_stages
from mlops_spec.project import ENVIRONMENTS_DIR
from mlops_spec.rules import promotion_order
from tests.conftest import FIXTURE_SERVING_DIGEST, FIXTURE_TRAINING_DIGEST
from tests.model_signing import TRUSTED_KEYS_PEM

# image_registries is test_promote's fixture, imported so that pytest finds it here too.
from tests.test_promote import (  # noqa: F401
    MODEL_NAME,
    git,
    image_registries,
    make_repo,
    mlflow_secrets_as,
    register_source_model,
    release_yaml,
    store,
)
from tests.test_spec_errors import append, replace, run_cli

QA = """# qa: between staging and prod, on staging's host with ports of its own.
kind: staging
promote_from: staging

model_registry:
  port: {host_port: 5150}

image_registry:
  port: {host_port: 5151}

serving:
  replicas: 2
  port: {host_port: 8150}

models:
  iris-classifier:
    gates: {min_metrics: {accuracy: 0.85}}
  diabetes-regressor:
    gates: {min_metrics: {r2: 0.3}}
"""

PROD_EU = """# prod-eu: a second production stage, on a host of its own.
kind: prod
promote_from: qa

docker:
  url: ssh://deploy@prod-eu.example.com

labels:
  cost_centre: cc-ml-0003

artifact_store:
  protect: true

model_registry:
  port: {host_port: 5200}

image_registry:
  port: {host_port: 5201}

serving:
  replicas: 3
  port: {host_port: 8280}

monitoring:
  port: {host_port: 5290}

models:
  iris-classifier:
    gates: {min_metrics: {accuracy: 0.9}}
  diabetes-regressor:
    gates: {min_metrics: {r2: 0.35}}
"""


def invoke(environments: Path, *args: str):
    return CliRunner().invoke(app, [*args, "--environments", str(environments)], catch_exceptions=False)


def add_qa_and_prod_eu(environments: Path) -> None:
    """What a team writes to add two stages: two YAML files and prod's new source. No code."""
    (environments / "qa.yaml").write_text(QA)
    (environments / "prod-eu.yaml").write_text(PROD_EU)
    replace(environments / "prod.yaml", "promote_from: staging", "promote_from: qa")


def test_the_shipped_stages_and_their_promotion_chain():
    result = invoke(ENVIRONMENTS_DIR, "stages", "--format", "json")
    assert result.exit_code == 0, result.output
    listing = json.loads(result.output)
    assert [(stage["name"], stage["kind"], stage["promote_from"], stage["swarm"]) for stage in listing["stages"]] == [
        ("dev", "dev", None, False), ("staging", "staging", "dev", False), ("prod", "prod", "staging", False),
        ("cluster", "dev", None, True)]
    assert listing["promotions"] == [["dev", "staging"], ["staging", "prod"]]
    text = invoke(ENVIRONMENTS_DIR, "stages").output.splitlines()
    assert [line.split()[:2] for line in text] == [["dev", "dev"], ["staging", "staging"], ["prod", "prod"],
                                                   ["cluster", "dev"]]
    assert text[2].endswith("promoted from staging")


def test_adding_qa_and_prod_eu_needs_only_yaml(environments):
    add_qa_and_prod_eu(environments)

    validated = invoke(environments, "validate")
    assert validated.exit_code == 0, validated.output
    assert [line.split(":")[0] for line in validated.output.splitlines()] == [
        "ok dev", "ok staging", "ok qa", "ok prod", "ok prod-eu", "ok cluster"]
    listing = json.loads(invoke(environments, "stages", "--format", "json").output)
    assert listing["promotions"] == [["dev", "staging"], ["staging", "qa"], ["qa", "prod"], ["qa", "prod-eu"]]

    specs = load_all_stages(environments)
    assert (specs["qa"].kind, specs["prod-eu"].kind, specs["prod-eu"].docker.url) == (
        "staging", "prod", "ssh://deploy@prod-eu.example.com")
    # prod-eu gets prod's rules by its kind: protected volumes, retained on delete.
    volumes = [r for r in render("prod-eu", specs["prod-eu"]) if r.type == "docker:index/volume:Volume"
               and not r.inputs["name"].endswith(SECRET_FILES_SUFFIX)]
    assert volumes and all(r.protect and r.retain_on_delete for r in volumes)
    assert all(r.name.startswith("prod-eu-") for r in volumes)

    planned = invoke(environments, "plan", "qa", "--format", "json")
    assert planned.exit_code == 0, planned.output
    assert json.loads(planned.output)["stack"] == "qa"
    # The two prods may differ only where base.yaml allows: here labels and docker.
    assert invoke(environments, "parity", "prod", "prod-eu").exit_code == 0
    diffed = invoke(environments, "diff", "prod", "prod-eu", "--format", "json")
    assert diffed.exit_code == 1, diffed.output
    assert ("cc-ml-0002", "cc-ml-0003") in {(f["before"], f["after"]) for c in json.loads(diffed.output)["changes"]
                                            for f in c["fields"]}


def test_a_prod_kind_stage_gets_every_prod_rule_whatever_its_name(environments):
    add_qa_and_prod_eu(environments)
    replace(environments / "prod-eu.yaml", "  replicas: 3", "  replicas: 1")
    with pytest.raises(SpecError) as raised:
        load_stage("prod-eu", environments)
    assert str(raised.value).endswith("prod-eu.yaml:21: serving.replicas: prod serves each model with at least 2 "
                                      "replicas, got 1")

    replace(environments / "prod-eu.yaml", "  replicas: 1", "  replicas: 2")
    replace(environments / "prod-eu.yaml", "  iris-classifier:\n", "  iris-classifier:\n    release:\n"
                                           f"      version: 3\n      sha256: {'a' * 64}\n      images:\n"
                                           "        training: prod-eu/iris-classifier-training:v3\n"
                                           "        serving: localhost:5201/prod-eu/iris-classifier-serving@"
                                           f"{FIXTURE_SERVING_DIGEST}\n")
    with pytest.raises(SpecError) as raised:
        load_stage("prod-eu", environments)
    assert str(raised.value).endswith("prod-eu.yaml:33: models.iris-classifier.release.images.training: "
                                      "'prod-eu/iris-classifier-training:v3' is not pinned by digest; use "
                                      "name@sha256:<64 hex> (no 'latest', no bare tag)")


BROKEN_STAGES = {
    "no kind": (lambda env: replace(env / "staging.yaml", "kind: staging\n", ""),
                "staging.yaml: kind: say what this stage is: dev, staging or prod (missing; experiments are made by "
                "`mlops exp up`, never declared)"),
    "an experiment declared": (lambda env: replace(env / "dev.yaml", "kind: dev", "kind: experiment"),
                               "dev.yaml:2: kind: say what this stage is: dev, staging or prod (got 'experiment'; "
                               "experiments are made by `mlops exp up`, never declared)"),
    "a kind in base.yaml": (lambda env: append(env / "base.yaml", "kind: prod\n"),
                            "base.yaml:60: kind: each stage says what it is in its own file; remove it from base.yaml"),
    "a stage naming itself": (lambda env: append(env / "dev.yaml", "stage: prod\n"),
                              "dev.yaml:17: stage: a stage is named by its file; remove this key"),
    "staging without a source": (lambda env: replace(env / "staging.yaml", "promote_from: dev\n", ""),
                                 "staging.yaml:3: kind: staging stages run only what is promoted to them: add "
                                 "promote_from: <stage> naming the stage their releases come from"),
    "dev with a source": (lambda env: replace(env / "dev.yaml", "kind: dev", "kind: dev\npromote_from: staging"),
                          "dev.yaml:3: promote_from: dev stages build their own images and follow their newest "
                          "model; nothing is promoted into them: remove promote_from"),
    "a dangling source": (lambda env: replace(env / "prod.yaml", "promote_from: staging", "promote_from: stagin"),
                          "prod.yaml:4: promote_from: 'stagin' names no stage; stages here: cluster, dev, prod, "
                          "staging"),
    "prod feeding staging": (lambda env: replace(env / "staging.yaml", "promote_from: dev", "promote_from: prod"),
                             "staging.yaml:4: promote_from: prod is a prod stage; a staging stage is promoted from a "
                             "stage of its own kind or an earlier one (dev, then staging, then prod)"),
    "a cycle": (lambda env: (env.joinpath("qa.yaml").write_text(QA.replace("8150", "8151").replace(
                    "promote_from: staging", "promote_from: uat")),
                             env.joinpath("uat.yaml").write_text(QA.replace("5150", "5160").replace("5151", "5161")
                                                                 .replace("8150", "8160").replace(
                                 "promote_from: staging", "promote_from: qa"))),
                "promote_from: promotions go round in a circle: qa -> uat -> qa"),
}


@pytest.mark.parametrize("case", sorted(BROKEN_STAGES))
def test_a_broken_stage_identity_is_one_line_and_exit_2(environments, case, monkeypatch, capsys):
    breaks, expected = BROKEN_STAGES[case]
    breaks(environments)
    code, out, err = run_cli(monkeypatch, capsys, "validate", "--environments", str(environments))
    assert (code, out) == (2, "")
    assert len(err.strip().splitlines()) == 1, err
    assert err.strip().endswith(expected), err


def test_every_stage_is_checked_when_one_is_loaded(environments):
    """A broken promotion anywhere stops every command, as a port clash does: the chain is one piece."""
    replace(environments / "prod.yaml", "promote_from: staging", "promote_from: nowhere")
    with pytest.raises(SpecError, match="prod.yaml:4: promote_from: 'nowhere' names no stage"):
        load_stages(["dev"], environments)


def test_promotion_order_puts_each_stage_after_its_source(environments):
    add_qa_and_prod_eu(environments)
    assert promotion_order(load_all_stages(environments)) == ["dev", "staging", "qa", "prod", "prod-eu", "cluster"]


def test_promote_refuses_a_source_the_target_does_not_name(environments):
    before = {file.name: file.read_text() for file in environments.iterdir()}
    result = CliRunner().invoke(app, ["promote", "--from", "dev", "--to", "prod", "--environments", str(environments)])
    assert result.exit_code == 1
    assert result.output.strip() == "refused: prod is promoted from staging (prod.yaml: promote_from), not from dev"
    assert {file.name: file.read_text() for file in environments.iterdir()} == before


def test_a_new_stage_is_promoted_into_without_code(tmp_path, registries, image_registries, monkeypatch):
    """staging -> qa, with qa declared only in YAML: the model is copied into qa's MLflow and qa.yaml is pinned."""
    version, sha256 = register_source_model(registries, accuracy=0.97)
    environments = make_repo(tmp_path, staging_port=registries["source"],
                             releases={MODEL_NAME: release_yaml(version, sha256)})
    add_qa_and_prod_eu(environments)
    replace(environments / "qa.yaml", "host_port: 5150", f"host_port: {registries['target']}")
    git(environments.parent, "add", "environments")
    git(environments.parent, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "qa")
    mlflow_secrets_as(monkeypatch, staging="source", qa="target")
    for stage in ("staging", "qa"):
        monkeypatch.setenv(secret_variable(REGISTRY_PASSWORD, stage), f"{stage}-password")
    monkeypatch.setenv(secret_variable(TRUSTED_MODEL_KEYS, "qa"), TRUSTED_KEYS_PEM)
    images = image_registries

    result = CliRunner().invoke(app, ["promote", "--from", "staging", "--to", "qa", "--environments",
                                      str(environments)], catch_exceptions=False)

    assert result.exit_code == 0, result.output
    assert sorted(images.copies) == [("127.0.0.1:5151", f"qa/{MODEL_NAME}-serving", FIXTURE_SERVING_DIGEST),
                                     ("127.0.0.1:5151", f"qa/{MODEL_NAME}-training", FIXTURE_TRAINING_DIGEST)]
    released = load_stage("qa", environments).models[MODEL_NAME].release
    assert released is not None and released.sha256 == sha256 and isinstance(released.version, int)
    assert store(registries, "target").fetch(MODEL_NAME, released.version).sha256 == sha256
    refused = CliRunner().invoke(app, ["promote", "--from", "staging", "--to", "prod", "--environments",
                                       str(environments)])
    assert refused.output.strip() == "refused: prod is promoted from qa (prod.yaml: promote_from), not from staging"


def test_a_diff_across_the_change_that_declared_kinds_compares_what_runs(tmp_path):
    """Stage files committed before `kind` existed take their kind from the work tree's file."""
    environments = tmp_path / "repo" / "environments"
    shutil.copytree(ENVIRONMENTS_DIR, environments)
    for stage in ("dev", "staging", "prod", "cluster"):
        file = environments / f"{stage}.yaml"
        file.write_text("".join(line for line in file.read_text().splitlines(keepends=True)
                                if not line.startswith(("kind:", "promote_from:"))))
    git(environments.parent, "init", "-q", "-b", "main")
    git(environments.parent, "add", "environments")
    git(environments.parent, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "old")
    shutil.rmtree(environments)
    shutil.copytree(ENVIRONMENTS_DIR, environments)
    result = subprocess.run([sys.executable, "-m", "mlops", "diff",
                             "prod@HEAD", "prod", "--environments", str(environments), "--format", "json"],
                            capture_output=True, text=True, check=False)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert json.loads(result.stdout)["changes"] == []
