"""`mlops data` without a Docker engine: whether the newest dataset is fresh, which the retraining workflow asks,
and what the samples export reports."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml
from typer.testing import CliRunner

from mlops.cli import app
from mlops.commands import data
from mlops.modelstore import ModelVersion
from mlops_spec.project import ENVIRONMENTS_DIR

NEWEST = "b" * 64
OLDER = "a" * 64
LISTED = [{"name": f"{OLDER}.csv", "sha256": OLDER, "rows": 75, "added": "2026-11-01T00:00:00Z"},
          {"name": f"{NEWEST}.csv", "sha256": NEWEST, "rows": 120, "added": "2026-11-20T00:00:00Z"}]


class DevMlflow:
    """dev's MLflow holding version 7 of iris-classifier, trained on `dataset_sha256`."""

    dataset_sha256: str | None = None
    asked: list[tuple] = []

    def __init__(self, url: str, auth) -> None:
        self.auth = auth

    def latest_version(self, name: str) -> int:
        self.asked.append(("latest", name))
        return 7

    def find_version(self, name: str, sha256: str):
        self.asked.append(("find", name, sha256))
        return 7 if sha256 == "3" * 64 else None

    def fetch(self, name: str, version: int) -> ModelVersion:
        inputs = {"dataset": "sklearn.datasets.load_iris"} if self.dataset_sha256 is None else {
            "dataset": f"{self.dataset_sha256}.csv", "dataset_sha256": self.dataset_sha256}
        return ModelVersion(name=name, version=version, files={"model.pkl": b"", "manifest.json": json.dumps(
            {"inputs": inputs}).encode()})


@pytest.fixture
def dev_mlflow(monkeypatch):
    monkeypatch.setenv("MLOPS_MLFLOW_PASSWORD_DEV", "secret")
    monkeypatch.setattr(data, "MlflowStore", DevMlflow)
    monkeypatch.setattr(data, "stored_datasets", lambda spec, environments: list(LISTED))
    DevMlflow.asked = []
    return DevMlflow


@pytest.mark.parametrize(("trained_on", "fresh"), [(None, True), (OLDER, True), (NEWEST, False)],
                         ids=["built-in data", "older dataset", "newest dataset"])
def test_the_newest_dataset_is_fresh_unless_the_served_model_was_trained_on_it(dev_mlflow, trained_on, fresh):
    dev_mlflow.dataset_sha256 = trained_on
    result = CliRunner().invoke(app, ["data", "fresh", "--stage", "dev", "--serving", "dev"])
    assert dev_mlflow.asked == [("latest", "iris-classifier")], "dev serves its newest version"
    if fresh:
        assert (result.exit_code, result.output) == (0, f"FRESH name={NEWEST}.csv rows=120 added=2026-11-20T00:00:00Z\n")
    else:
        assert result.exit_code == 1
        assert result.output == (f"no dataset newer than {NEWEST}.csv (added 2026-11-20T00:00:00Z), which dev's model "
                                 "was trained on: retraining would learn nothing new\n")


def test_a_promoted_model_is_found_in_dev_by_its_sha256(dev_mlflow, released_environments):
    dev_mlflow.dataset_sha256 = NEWEST
    result = CliRunner().invoke(app, ["data", "fresh", "--stage", "dev", "--serving", "prod",
                                      "--environments", str(released_environments)])
    assert dev_mlflow.asked == [("find", "iris-classifier", "3" * 64)]
    assert result.exit_code == 1 and "which prod's model was trained on" in result.output


def test_a_served_model_unknown_to_dev_is_one_line_and_exit_2(dev_mlflow, released_environments):
    prod = released_environments / "prod.yaml"
    prod.write_text(prod.read_text().replace("3" * 64, "4" * 64))
    result = CliRunner().invoke(app, ["data", "fresh", "--stage", "dev", "--serving", "prod",
                                      "--environments", str(released_environments)])
    assert result.exit_code == 2
    assert result.output == (f"error: prod's model iris-classifier (sha256 {'4' * 64}) is not in dev's MLflow, where it "
                             "was trained: cannot tell which data it was trained on\n")


def test_no_dataset_at_all_is_not_fresh(dev_mlflow, monkeypatch):
    monkeypatch.setattr(data, "stored_datasets", lambda spec, environments: [])
    result = CliRunner().invoke(app, ["data", "fresh", "--stage", "dev", "--serving", "prod"])
    assert (result.exit_code, result.output) == (1, "no dataset on dev-datasets: nothing fresh to train on; add one "
                                                    "with `mlops data add --stage dev FILE.csv`\n")
    assert dev_mlflow.asked == []


def test_samples_say_how_many_unreadable_lines_the_export_skipped(monkeypatch, tmp_path):
    environments = tmp_path / "environments"
    shutil.copytree(ENVIRONMENTS_DIR, environments)
    dev = yaml.safe_load((environments / "dev.yaml").read_text())
    dev["serving"]["sampling"] = {"fraction": 1.0}
    (environments / "dev.yaml").write_text(yaml.safe_dump(dev))
    exported = b'"sepal length (cm)","prediction","label"\n"5.1","0",""\n'
    skipped = b"skipped 2 unreadable lines (first: s-serving-blue-0.jsonl:3: JSONDecodeError: Expecting value)\n"
    monkeypatch.setattr(data, "run_in_stage", lambda *args, **kwargs: subprocess.CompletedProcess([], 0, exported, skipped))
    out = tmp_path / "s.csv"
    result = CliRunner().invoke(app, ["data", "samples", "--stage", "dev", "--out", str(out),
                                      "--environments", str(environments)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == (f"{out}: 1 sampled rows; skipped 2 unreadable lines (first: "
                                     "s-serving-blue-0.jsonl:3: JSONDecodeError: Expecting value); fill in `label`, "
                                     f"then `mlops data add --stage dev {out}`")
    assert out.read_bytes() == exported
