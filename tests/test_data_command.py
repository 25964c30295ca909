"""`mlops data` without a Docker engine: whether the newest dataset is fresh, which the retraining workflow asks,
and what the samples export reports."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import yaml
from typer.testing import CliRunner

from mlops import reach
from mlops.cli import app
from mlops.commands import data
from mlops.modelstore import ModelVersion
from mlops_spec.contract import datasets_folder
from mlops_spec.model_project import load_model_project
from mlops_spec.project import ENVIRONMENTS_DIR

NEWEST = "b" * 64
OLDER = "a" * 64
LISTED = [{"name": f"{OLDER}.csv", "sha256": OLDER, "rows": 75, "added": "2026-11-01T00:00:00Z"},
          {"name": f"{NEWEST}.csv", "sha256": NEWEST, "rows": 120, "added": "2026-11-20T00:00:00Z"}]


class DevMlflow:
    """dev's MLflow holding version 7 of iris-classifier, trained on `dataset_sha256`."""

    dataset_sha256: str | None = None
    asked: list[tuple] = []

    def __init__(self, url: str, auth, ca_certificate: str | None = None) -> None:
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
    monkeypatch.setattr(reach, "MlflowStore", DevMlflow)  # the client `StageReach.model_store` opens
    monkeypatch.setattr(data, "stored_datasets", lambda spec, model, environments: list(LISTED))
    DevMlflow.asked = []
    return DevMlflow


@pytest.mark.parametrize(("trained_on", "fresh"), [(None, True), (OLDER, True), (NEWEST, False)],
                         ids=["built-in data", "older dataset", "newest dataset"])
def test_the_newest_dataset_is_fresh_unless_the_served_model_was_trained_on_it(dev_mlflow, trained_on, fresh):
    dev_mlflow.dataset_sha256 = trained_on
    result = CliRunner().invoke(app, ["data", "fresh", "--stage", "dev", "--serving", "dev", "--model", "iris-classifier"])
    assert dev_mlflow.asked == [("latest", "iris-classifier")], "dev serves its newest version"
    if fresh:
        assert (result.exit_code, result.output) == (0, f"FRESH name={NEWEST}.csv rows=120 added=2026-11-20T00:00:00Z\n")
    else:
        assert result.exit_code == 1
        assert result.output == (f"no dataset of iris-classifier newer than {NEWEST}.csv (added 2026-11-20T00:00:00Z), "
                                 "which dev's version was trained on: retraining would learn nothing new\n")


def test_a_promoted_model_is_found_in_dev_by_its_sha256(dev_mlflow, released_environments):
    dev_mlflow.dataset_sha256 = NEWEST
    result = CliRunner().invoke(app, ["data", "fresh", "--stage", "dev", "--serving", "prod", "--model", "iris-classifier",
                                      "--environments", str(released_environments)])
    assert dev_mlflow.asked == [("find", "iris-classifier", "3" * 64)]
    assert result.exit_code == 1 and "which prod's version was trained on" in result.output


def test_a_model_the_serving_stage_does_not_serve_is_fresh_with_any_dataset(dev_mlflow, released_environments):
    result = CliRunner().invoke(app, ["data", "fresh", "--stage", "dev", "--serving", "prod",
                                      "--model", "diabetes-regressor", "--environments", str(released_environments)])
    assert (result.exit_code, result.output) == (0, f"FRESH name={NEWEST}.csv rows=120 added=2026-11-20T00:00:00Z\n")
    assert dev_mlflow.asked == [], "prod serves no version of it to compare with"


def test_a_served_model_unknown_to_dev_is_one_line_and_exit_2(dev_mlflow, released_environments):
    prod = released_environments / "prod.yaml"
    prod.write_text(prod.read_text().replace("3" * 64, "4" * 64))
    result = CliRunner().invoke(app, ["data", "fresh", "--stage", "dev", "--serving", "prod", "--model", "iris-classifier",
                                      "--environments", str(released_environments)])
    assert result.exit_code == 2
    assert result.output == (f"error: prod's version of iris-classifier (sha256 {'4' * 64}) is not in dev's MLflow, "
                             "where it was trained: cannot tell which data it was trained on\n")


def test_no_dataset_at_all_is_not_fresh(dev_mlflow, monkeypatch):
    monkeypatch.setattr(data, "stored_datasets", lambda spec, model, environments: [])
    result = CliRunner().invoke(app, ["data", "fresh", "--stage", "dev", "--serving", "prod", "--model", "iris-classifier"])
    assert (result.exit_code, result.output) == (1, "no dataset of iris-classifier on dev-datasets: nothing fresh to "
                                                    "train on; add one with `mlops data add --stage dev --model "
                                                    "iris-classifier FILE.csv`\n")
    assert dev_mlflow.asked == []


def test_samples_export_the_models_replicas_and_say_how_many_unreadable_lines_were_skipped(monkeypatch, tmp_path):
    environments = tmp_path / "environments"
    shutil.copytree(ENVIRONMENTS_DIR, environments)
    dev = yaml.safe_load((environments / "dev.yaml").read_text())
    dev["models"]["iris-classifier"]["sampling"] = {"fraction": 1.0}
    (environments / "dev.yaml").write_text(yaml.safe_dump(dev))
    exported = b'"sepal length (cm)","prediction","label"\n"5.1","0",""\n'
    skipped = b"skipped 2 unreadable lines (first: dev-iris-classifier-blue-0.jsonl:3: JSONDecodeError: Expecting value)\n"
    runs = []

    def run_in_stage(spec, model, environments, volume, mount, read_only, command, **kwargs):
        runs.append((model, volume, mount, read_only, command))
        return subprocess.CompletedProcess([], 0, exported, skipped)
    monkeypatch.setattr(data, "run_in_stage", run_in_stage)
    out = tmp_path / "s.csv"
    result = CliRunner().invoke(app, ["data", "samples", "--stage", "dev", "--model", "iris-classifier",
                                      "--out", str(out), "--environments", str(environments)])
    assert result.exit_code == 0, result.output
    assert runs == [("iris-classifier", "samples", "/data/samples", True,
                     ["samples", "dev-iris-classifier-blue", "dev-iris-classifier-green"])], "its own replicas' files"
    assert result.output.strip() == (f"{out}: 1 sampled rows of iris-classifier; skipped 2 unreadable lines (first: "
                                     "dev-iris-classifier-blue-0.jsonl:3: JSONDecodeError: Expecting value); fill in "
                                     f"the label, then `mlops data add --stage dev --model iris-classifier {out}`")
    assert out.read_bytes() == exported
    refused = CliRunner().invoke(app, ["data", "samples", "--stage", "dev", "--model", "diabetes-regressor",
                                       "--out", str(tmp_path / "d.csv"), "--environments", str(environments)])
    assert (refused.exit_code, refused.output) == (2, "error: dev does not sample diabetes-regressor's requests: "
                                                      "declare models.diabetes-regressor.sampling (docs/contracts.md "
                                                      "says what it keeps)\n")
    assert len(runs) == 1 and not (tmp_path / "d.csv").exists()


IRIS_HEADER = "sepal length (cm),sepal width (cm),petal length (cm),petal width (cm),label"


@pytest.fixture
def added(monkeypatch):
    """What `mlops data add` ran in the stage: (model, volume, mount, read_only, command, the bytes piped in, read
    from the file's descriptor as the container's `docker run -i` reads them)."""
    runs = []

    def run_in_stage(spec, model, environments, volume, mount, read_only, command, stdin=None, refused=""):
        piped = subprocess.run(["cat"], stdin=stdin, capture_output=True, check=True).stdout
        runs.append((model, volume, mount, read_only, command, piped))
        return subprocess.CompletedProcess([], 0, b"ADDED name=" + NEWEST.encode() + b".csv rows=1\n", b"")
    monkeypatch.setattr(data, "run_in_stage", run_in_stage)
    return runs


def test_a_dataset_is_added_to_its_models_folder(added, tmp_path):
    file = tmp_path / "iris.csv"
    file.write_text(f"{IRIS_HEADER}\n5.1,3.5,1.4,0.2,0\n")
    result = CliRunner().invoke(app, ["data", "add", "--stage", "dev", "--model", "iris-classifier", str(file)])
    assert result.exit_code == 0, result.output
    assert added == [("iris-classifier", "datasets", "/data/datasets", False, ["add"], file.read_bytes())]
    assert result.output.strip() == (f"{file}: ADDED name={NEWEST}.csv rows=1 in /data/datasets/iris-classifier on "
                                     "dev-datasets")


def test_data_of_another_model_is_refused_by_its_header_before_the_engine(added, tmp_path):
    file = tmp_path / "iris.csv"
    file.write_text(f"{IRIS_HEADER}\n5.1,3.5,1.4,0.2,0\n")
    result = CliRunner().invoke(app, ["data", "add", "--stage", "dev", "--model", "diabetes-regressor", str(file)])
    expected = ",".join(load_model_project("diabetes-regressor").input_schema.header)
    assert (result.exit_code, result.output) == (2, f"error: {file}: the header must be diabetes-regressor's features "
                                                    f"then its label, {expected} (a 'prediction' column is allowed and "
                                                    f"dropped); got {IRIS_HEADER}\n")
    assert added == []


@pytest.mark.parametrize("command", [["add", "any.csv"], ["list"], ["samples", "--out", "s.csv"],
                                     ["fresh", "--serving", "prod"]])
def test_every_data_command_names_its_model_on_a_stage_of_several(command, added):
    result = CliRunner().invoke(app, ["data", command[0], "--stage", "dev", *command[1:]])
    assert (result.exit_code, result.output) == (2, "error: dev declares 2 models (diabetes-regressor, "
                                                    "iris-classifier): name one with --model\n")
    assert added == []


def test_the_cli_and_the_training_image_agree_on_a_models_datasets_folder():
    from tests.test_training import IRIS, datasets

    assert str(datasets.model_folder(IRIS, datasets.DATASETS_DIR)) == datasets_folder("iris-classifier") == "/data/datasets/iris-classifier"
