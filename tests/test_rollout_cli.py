"""What a person does with a model's rollout: `mlops promote --to STAGE --green` once it finished, and the status
rows of each served model and slot."""
from __future__ import annotations

import subprocess

import pytest
import yaml

from mlops import rollout
from mlops.rollout import SlotRow, status_rows
from mlops_spec.contract import release_id
from mlops_spec.loading import load_stage
from mlops_spec.models import ModelPin
from tests.conftest import pinned_image
from tests.test_promote import gateway_recorded
from tests.test_spec_errors import run_cli

GREEN_PIN = {"name": "iris-classifier", "version": 5, "sha256": "5" * 64}
GREEN = {"version": GREEN_PIN["version"], "sha256": GREEN_PIN["sha256"]}
GREEN_IMAGE = pinned_image("prod", "serving", "sha256:" + "6" * 64)
POLICY = {"steps": [10, 100], "bake_time_s": 60, "max_error_rate_increase": 0.01, "max_p99_latency_ratio": 1.5}


def git(repo, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def prod_with_green(released_environments):
    """Committed specs where prod serves iris-classifier's release as blue and a green under a rollout policy."""
    file = released_environments / "prod.yaml"
    data = yaml.safe_load(file.read_text())
    data["models"]["iris-classifier"] |= {"green": {**GREEN, "serving_image": GREEN_IMAGE, "rollout": POLICY},
                                          "traffic": {"blue": 95, "green": 5}}
    data["monitoring"] = {"port": {"host_port": 9290}}
    file.write_text(yaml.safe_dump(data, sort_keys=False))
    repo = released_environments.parent
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "environments")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-q", "-m", "stages")
    return released_environments


def green_state(phase: str) -> dict:
    return {"green_release": release_id(ModelPin.model_validate(GREEN_PIN)), "phase": phase, "step": 1, "green_weight": 100}


@pytest.mark.parametrize("args", [["--from", "staging", "--green"], []])
def test_either_from_or_green(prod_with_green, monkeypatch, capsys, args):
    code, out, err = run_cli(monkeypatch, capsys, "promote", "--to", "prod", *args,
                             "--environments", str(prod_with_green))
    assert (code, out, err) == (2, "", "refused: give either --from STAGE or --green\n")


def iris(slot: str) -> dict[str, str]:
    return {"model": "iris-classifier", "slot": slot}


def test_status_rows_put_the_controller_state_beside_prometheus(prod_with_green):
    spec = load_stage("prod", prod_with_green)
    answers = {
        "mlops:gateway_errors:ratio_rate1m": [(iris("blue"), 0.001), (iris("green"), 0.25),
                                              ({"model": "diabetes-regressor", "slot": "blue"}, 0.5)],
        "mlops:gateway_latency_seconds:p99_1m": [(iris("blue"), 0.012), (iris("green"), float("nan"))],
        "max by (model, slot) (mlops:drift_psi:max)": [(iris("blue"), 0.04)],
    }
    state = {**green_state("baking"), "step": 0, "green_weight": 10, "last_judgement": {"verdict": "healthy"}}
    rows = status_rows(spec, answers.__getitem__, {"iris-classifier": state})
    assert rows == [
        SlotRow("iris-classifier", "blue", "4", 3, 90, 0.001, 12.0, 0.04, "-"),
        SlotRow("iris-classifier", "green", "5", 3, 10, 0.25, None, None, "baking, step 1/2, last judgement: healthy"),
    ]
    assert rows[1].cells() == ["iris-classifier", "green", "5", "3", "10%", "25.00%", "-", "-",
                               "baking, step 1/2, last judgement: healthy"]
    declared = status_rows(spec, lambda promql: [], {})
    assert [(row.weight, row.rollout) for row in declared] == [(95, "-"), (5, "not started")]


def test_each_served_model_has_its_rows_its_replicas_and_its_own_rollout_state(prod_with_green, monkeypatch):
    """A state recorded for one model's green never moves another model's weights."""
    file = prod_with_green / "prod.yaml"
    data = yaml.safe_load(file.read_text())
    data["models"]["diabetes-regressor"] |= {
        "release": {"version": 2, "sha256": "7" * 64, "images": {
            "training": pinned_image("prod", "diabetes-regressor-training", "sha256:" + "8" * 64),
            "serving": pinned_image("prod", "diabetes-regressor-serving", "sha256:" + "9" * 64)}},
        "replicas": 2}
    file.write_text(yaml.safe_dump(data, sort_keys=False))
    asked = gateway_recorded(monkeypatch, {**green_state("baking"), "step": 0, "green_weight": 10})
    spec = load_stage("prod", prod_with_green).model_copy(update={"monitoring": None})
    rows = rollout.stage_status(spec, "prod")
    assert asked == [("prod", "iris-classifier")], "only a model with a rollout has a state to read"
    assert [(row.model, row.slot, row.version, row.replicas, row.weight, row.rollout) for row in rows] == [
        ("diabetes-regressor", "blue", "2", 2, 100, "-"),
        ("iris-classifier", "blue", "4", 3, 90, "-"),
        ("iris-classifier", "green", "5", 3, 10, "baking, step 1/2")]


def test_a_stage_without_monitoring_shows_its_declared_weights_and_no_numbers(released_environments, monkeypatch):
    asked = gateway_recorded(monkeypatch, None)
    unmonitored = load_stage("prod", released_environments).model_copy(update={"monitoring": None})
    rows = rollout.stage_status(unmonitored, "prod")
    assert asked == [], "no model rolls out a green"
    assert rows == [SlotRow("iris-classifier", "blue", "4", 3, 100, None, None, None, "-")]
