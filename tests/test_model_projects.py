"""Model projects (models/<name>/, docs/models.md): the project file and its checks, the training image's runner
around a project's entrypoint, and the content tags of the model images built from a project."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from components.images import BuildSettings, content_tag, model_image_name
from mlops_spec.errors import SpecError
from mlops_spec.model_project import PLATFORM_LOCKS, load_model_project
from mlops_spec.project import REPO_ROOT, working_on

sys.path.insert(0, str(REPO_ROOT / "images" / "training"))
from mlops_training.cli import main as runner_main  # noqa: E402
from mlops_training.project import load_project  # noqa: E402

PROJECT = "diabetes-regressor"
SETTINGS = BuildSettings(base_image="mlops-base:bookworm", platform="linux/amd64")


@pytest.fixture
def root(tmp_path) -> Path:
    """A project holding the platform's locks, the model Dockerfile and a copy of the diabetes project."""
    for lock in PLATFORM_LOCKS:
        (tmp_path / lock).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO_ROOT / lock, tmp_path / lock)
    for folder in ("images/training", "images/serving", "images/model"):
        shutil.copytree(REPO_ROOT / folder, tmp_path / folder, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("wheels", "__pycache__"))
    for model in ("diabetes-regressor", "iris-classifier"):
        shutil.copytree(REPO_ROOT / "models" / model, tmp_path / "models" / model,
                        ignore=shutil.ignore_patterns("wheels", "__pycache__"))
    return tmp_path


def problem(root: Path, model: str = PROJECT) -> str:
    with working_on(root), pytest.raises(SpecError) as raised:
        load_model_project(model)
    assert "\n" not in str(raised.value)
    return str(raised.value)


def edit(root: Path, name: str, old: str, new: str) -> None:
    file = root / "models" / PROJECT / name
    assert old in file.read_text()
    file.write_text(file.read_text().replace(old, new))


def test_the_shipped_projects_load():
    for model in ("iris-classifier", "diabetes-regressor"):
        project = load_model_project(model)
        assert project.input_schema.header[-1] == ("label" if model == "iris-classifier" else "progression")


@pytest.mark.parametrize(("file", "old", "new", "expected"), [
    ("mlops-model.yaml", "task: regression", "task: ranking",
     "models/diabetes-regressor/mlops-model.yaml:3: task: Input should be 'classification' or 'regression'"),
    ("mlops-model.yaml", "{name: bp, type: float}", "{name: bp, type: complex}",
     "models/diabetes-regressor/mlops-model.yaml:12: schema.features.3.type: Input should be 'float', 'int' or 'str'"),
    ("mlops-model.yaml", "{name: bp, type: float}", "{name: bp, type: str}",
     "schema: feature 'bp' has type str; a feature is one of float, int"),
    ("mlops-model.yaml", "label: {name: progression, type: float}", "label: {name: progression, type: int}",
     "a regression label has type float, got int"),
    ("mlops-model.yaml", "entrypoint: diabetes_model.train", "entrypoint: diabetes_model.fit",
     "models/diabetes-regressor/mlops-model.yaml:4: entrypoint: module diabetes_model.fit is not in the project: "
     "add diabetes_model/fit.py"),
    ("mlops-model.yaml", "default_data: data/diabetes.csv", "default_data: data/missing.csv",
     "mlops-model.yaml:6: default_data: data/missing.csv is not a file of the project"),
    ("data/diabetes.csv", "s6,progression", "s6,target",
     "default_data: the header of data/diabetes.csv must be the schema's features then its label: "
     "age,sex,bmi,bp,s1,s2,s3,s4,s5,s6,progression; got age,sex,bmi,bp,s1,s2,s3,s4,s5,s6,target"),
    ("mlops-model.yaml", "params: {alpha: 1.0}", "params: {alpha: 1.0}\nowner: me",
     "mlops-model.yaml:6: owner: unknown key 'owner'; allowed here: default_data, entrypoint, params, schema, skops, "
     "task"),
    ("mlops-model.yaml", "params: {alpha: 1.0}", "params: {alpha: 1.0}\nskops: {trusted_types: [Tree]}",
     "mlops-model.yaml:6: skops.trusted_types.0: String should match pattern"),
    ("mlops-model.yaml", "params: {alpha: 1.0}", "params: {alpha: 1.0}\nskops: {trusted_types: [a.B, a.B]}",
     "mlops-model.yaml:6: skops: trusted types must be distinct: a.B repeated"),
    ("mlops-model.yaml", "params: {alpha: 1.0}", "params: {alpha: 1.0}\nskops: {trusted: [a.B]}",
     "mlops-model.yaml:6: skops.trusted: unknown key 'trusted'; allowed here: trusted_types"),
    ("requirements.lock", "numpy==2.4.6", "numpy==2.3.0",
     "models/diabetes-regressor/requirements.lock:{line}: pins numpy==2.3.0 but images/training/requirements.lock "
     "pins numpy==2.4.6, and both are installed into one venv; compile it against the platform's locks"),
], ids=["task", "type", "feature type", "label type", "entrypoint", "no data", "header", "unknown key",
        "skops type name", "skops type repeated", "skops unknown key", "pin"])
def test_a_bad_project_is_one_line_naming_its_file(root, file, old, new, expected):
    edit(root, file, old, new)
    lines = (root / "models" / PROJECT / "requirements.lock").read_text().splitlines()
    line = next((number for number, text in enumerate(lines, 1) if text.startswith("numpy==")), 0)
    assert expected.format(line=line) in problem(root)


def test_a_project_without_a_lock_or_hashes_is_refused(root):
    lock = root / "models" / PROJECT / "requirements.lock"
    unhashed = "\n".join(line for line in lock.read_text().splitlines() if "--hash" not in line).replace(" \\", "")
    lock.write_text(unhashed + "\n")
    assert "requirements.lock:3: cloudpickle==3.1.3 has no --hash: images install by hash only" in problem(root)
    lock.unlink()
    assert problem(root).startswith("models/diabetes-regressor/requirements.lock: the project has no requirements.lock")


def test_a_model_name_that_is_no_dns_label_is_refused(root):
    shutil.copytree(root / "models" / PROJECT, root / "models" / "Diabetes_Model")
    assert "'Diabetes_Model' is not a model name" in problem(root, "Diabetes_Model")
    assert problem(root, "absent").endswith("no project for model 'absent': create "
                                            "models/absent/mlops-model.yaml (docs/models.md)")


def write_entrypoint(root: Path, body: str) -> Path:
    folder = root / "models" / PROJECT
    (folder / "diabetes_model" / "train.py").write_text(
        "import argparse, json, pathlib, pickle, sys\n"
        "parser = argparse.ArgumentParser()\n"
        "for flag in ('--data', '--output-dir', '--seed', '--subset', '--params'): parser.add_argument(flag)\n"
        "args = parser.parse_args()\nout = pathlib.Path(args.output_dir)\n" + body)
    return folder


@pytest.mark.parametrize(("body", "message"), [
    ("(out / 'metrics.json').write_text('{}')\n",
     "error: diabetes_model.train wrote no model.pkl to its --output-dir; nothing was registered"),
    ("from sklearn.dummy import DummyRegressor\nimport numpy as np\n"
     "(out / 'model.pkl').write_bytes(pickle.dumps(DummyRegressor().fit(np.zeros((2, 3)), [1, 2])))\n"
     "from sklearn.linear_model import Ridge\n"
     "(out / 'model.pkl').write_bytes(pickle.dumps(Ridge().fit(np.zeros((2, 3)), [1, 2])))\n"
     "(out / 'metrics.json').write_text('{}')\n",
     "error: model.pkl cannot predict one row of the schema's 10 features (ValueError"),
    ("from sklearn.linear_model import Ridge\nimport numpy as np\n"
     "(out / 'model.pkl').write_bytes(pickle.dumps(Ridge().fit(np.zeros((2, 10)), [1, 2])))\n"
     "(out / 'metrics.json').write_text(json.dumps({'r2': 'high'}))\n",
     "error: metrics.json: 'r2' is \"high\", not a finite number; nothing was registered"),
    ("from sklearn.linear_model import Ridge\nimport numpy as np\n"
     "(out / 'model.pkl').write_bytes(pickle.dumps(Ridge().fit(np.zeros((2, 10)), [1, 2])))\n"
     "(out / 'metrics.json').write_text(json.dumps({'r2': {'train': 1}}))\n",
     "error: metrics.json: 'r2' is {\"train\": 1}, not a finite number"),
    ("(out / 'model.pkl').write_bytes(pickle.dumps({'weights': [1]}))\n",
     "error: model.pkl holds a dict, which has no predict(); nothing was registered"),
], ids=["no model", "wrong width", "metric not a number", "nested metrics", "no predict"])
def test_a_bad_output_is_one_error_line_exit_2_and_nothing_registered(root, body, message, capsys, monkeypatch):
    folder = write_entrypoint(root, body)
    # A tracking URI nobody answers at: the run must fail before it would register anything.
    code = runner_main(["--project", str(folder), "--output-dir", str(root / "out"),
                        "--tracking-uri", "http://127.0.0.1:9"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(message)
    assert not (root / "out" / "manifest.json").exists()


def test_the_regressor_manifest_carries_schema_task_and_target_bins(tmp_path):
    project = load_project(REPO_ROOT / "models" / PROJECT)
    assert runner_main(["--project", str(project.directory), "--output-dir", str(tmp_path)]) == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert (manifest["task"], manifest["schema"]) == ("regression", project.schema)
    bins = manifest["reference_profile"]["target_bins"]
    assert len(bins["proportions"]) == len(bins["edges"]) + 1 <= 10
    assert sum(bins["proportions"]) == pytest.approx(1, abs=1e-5)
    assert "class_shares" not in manifest["reference_profile"]
    assert [feature["name"] for feature in manifest["reference_profile"]["features"]] == project.header[:-1]
    assert set(manifest["outputs"]["metrics"]) == {"r2", "rmse"}


def test_a_model_tag_changes_with_its_project_and_its_platform_image_only(root):
    def tags() -> dict[str, str]:
        with working_on(root):
            return {f"{model}/{image}": model_image_name("dev", image, f"images/{image}", SETTINGS, model,
                                                         target="oip" if image == "serving" else None)
                    for model in ("iris-classifier", "diabetes-regressor") for image in ("training", "serving")}

    before = tags()
    assert len(set(before.values())) == 4
    # What running the project locally leaves is no input (the project's .dockerignore): the tag a laptop
    # computes is the clean clone's.
    bytecode = root / "models" / PROJECT / "diabetes_model" / "__pycache__"
    bytecode.mkdir()
    (bytecode / "train.cpython-311.pyc").write_bytes(b"local bytecode")
    assert tags() == before
    with (root / "models" / PROJECT / "diabetes_model" / "transformers.py").open("a") as file:
        file.write("# changed\n")
    after_code = tags()
    assert {key for key in before if before[key] != after_code[key]} == {f"{PROJECT}/training", f"{PROJECT}/serving"}
    with (root / "images" / "training" / "mlops_training" / "runner.py").open("a") as file:
        file.write("# changed\n")
    after_platform = tags()
    assert {key for key in after_code if after_code[key] != after_platform[key]} == {
        "iris-classifier/training", f"{PROJECT}/training"}
    with (root / "images" / "model" / "Dockerfile").open("a") as file:
        file.write("# changed\n")
    after_dockerfile = tags()
    assert all(after_platform[key] != after_dockerfile[key] for key in after_platform)
    with working_on(root):
        assert content_tag("images/training", SETTINGS) == content_tag("images/training", SETTINGS)
