"""The training code of images/training, run in-process: deterministic models and clear input errors."""
from __future__ import annotations

import hashlib
import json
import sys

import pytest

from mlops.spec import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "images" / "training"))

from mlops_training.cli import main  # noqa: E402
from mlops_training.train import TrainingError, TrainingRequest, train  # noqa: E402


def model_sha256(request: TrainingRequest, output_dir) -> str:
    result = train(request, output_dir)
    assert hashlib.sha256(result.model_path.read_bytes()).hexdigest() == result.model_sha256
    return result.model_sha256


def test_same_inputs_give_a_byte_identical_model(tmp_path):
    request = TrainingRequest(seed=7, subset=0.8, params={"n_estimators": 20})
    assert model_sha256(request, tmp_path / "first") == model_sha256(request, tmp_path / "second")
    assert (tmp_path / "first" / "model.pkl").read_bytes() == (tmp_path / "second" / "model.pkl").read_bytes()


@pytest.mark.parametrize("changed", [{"seed": 8}, {"params": {"n_estimators": 21}}, {"subset": 0.7}],
                         ids=["seed", "param", "subset"])
def test_a_different_input_gives_a_different_model(tmp_path, changed):
    baseline = {"seed": 7, "subset": 0.8, "params": {"n_estimators": 20}}
    assert (model_sha256(TrainingRequest(**baseline), tmp_path / "baseline")
            != model_sha256(TrainingRequest(**{**baseline, **changed}), tmp_path / "changed"))


def test_subset_trains_on_a_stratified_fraction(tmp_path):
    manifest = train(TrainingRequest(subset=0.5), tmp_path).manifest
    inputs = manifest["inputs"]
    assert inputs["train_samples"] + inputs["held_out_samples"] == 75  # half of iris' 150
    assert inputs["subset"] == 0.5
    assert 0 < manifest["outputs"]["metrics"]["accuracy"] <= 1


def test_manifest_records_inputs_environment_and_outputs(tmp_path, monkeypatch):
    lock = tmp_path / "requirements.lock"
    lock.write_text("scikit-learn==1.9.1\n")
    monkeypatch.setenv("TRAINING_LOCK_FILE", str(lock))
    monkeypatch.setenv("TRAINING_IMAGE_DIGEST", "sha256:" + "a" * 64)
    result = train(TrainingRequest(seed=3, params={"max_depth": 3}), tmp_path / "out")
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest == result.manifest
    assert manifest["inputs"]["params"] == {"max_depth": 3}
    assert manifest["inputs"]["seed"] == 3
    assert len(manifest["inputs"]["data_sha256"]) == len(manifest["inputs"]["code_version"]) == 64
    assert manifest["environment"] == {"image_digest": "sha256:" + "a" * 64,
                                       "lock_sha256": hashlib.sha256(lock.read_bytes()).hexdigest()}
    assert set(manifest["outputs"]["metrics"]) == {"accuracy", "f1_macro"}


def test_unknown_param_names_the_allowed_ones():
    with pytest.raises(TrainingError,
                       match=r"unknown parameter\(s\) n_trees for RandomForestClassifier; allowed: .*n_estimators"):
        TrainingRequest(params={"n_trees": 5})


def test_invalid_param_value_is_a_training_error(tmp_path):
    with pytest.raises(TrainingError, match="invalid --param: The 'max_depth' parameter of RandomForestClassifier"):
        train(TrainingRequest(params={"max_depth": "deep"}), tmp_path)


def test_seed_outside_numpy_range_is_rejected():
    with pytest.raises(TrainingError, match=r"--seed must be in \[0, 2\*\*32\), got -1"):
        TrainingRequest(seed=-1)


@pytest.mark.parametrize("subset", [0, -0.5, 1.5])
def test_subset_outside_the_unit_interval_is_rejected(subset):
    with pytest.raises(TrainingError, match=r"--subset must be a fraction in \(0, 1\]"):
        TrainingRequest(subset=subset)


def test_command_line_prints_one_error_line_and_exits_2(tmp_path, capsys):
    assert main(["--output-dir", str(tmp_path), "--param", "n_trees=5"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: unknown parameter(s) n_trees")


def test_command_line_ends_with_a_machine_readable_line(tmp_path, capsys):
    assert main(["--output-dir", str(tmp_path), "--subset", "0.5", "--param", "n_estimators=10"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    sha256 = hashlib.sha256((tmp_path / "model.pkl").read_bytes()).hexdigest()
    assert last == f"TRAINED sha256={sha256} output_dir={tmp_path}"
