"""`mlops` works on the project it is run in: the nearest folder upwards with Pulumi.yaml and environments/.

An editable install points the package at one clone; a second clone or worktree must still read its own specs
and build contexts. Each command here runs in a fresh process that imports `mlops` from wherever it is
installed (`-P`: never from the current directory), as the `mlops` console script does.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mlops import cli

CHECKOUT = Path(__file__).resolve().parent.parent
PROJECT_FILES = ("Pulumi.yaml", "environments", "images", "models")
SHIPPED_COST_CENTRE = "cost_centre: cc-ml-0002"
OTHER_COST_CENTRE = "cost_centre: cc-ml-0999"


def mlops(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-P", "-c", "from mlops.cli import main; main()", *args], cwd=cwd,
                          check=False, capture_output=True, text=True, timeout=120)


def copy_project(destination: Path) -> Path:
    """The files a command reads from a project: Pulumi.yaml, the specs, the build contexts and the model projects."""
    destination.mkdir()
    for name in PROJECT_FILES:
        source = CHECKOUT / name
        if source.is_dir():
            shutil.copytree(source, destination / name, ignore=shutil.ignore_patterns("wheels", "__pycache__"))
        else:
            shutil.copy2(source, destination / name)
    return destination


def replace(file: Path, old: str, new: str) -> None:
    text = file.read_text()
    assert old in text
    file.write_text(text.replace(old, new))


@pytest.fixture
def two_projects(tmp_path) -> tuple[Path, Path]:
    """Two copies of the project; the second's prod has another cost centre and another mlflow build context."""
    first, second = copy_project(tmp_path / "first"), copy_project(tmp_path / "second")
    replace(second / "environments" / "prod.yaml", SHIPPED_COST_CENTRE, OTHER_COST_CENTRE)
    dockerfile = second / "images" / "mlflow" / "Dockerfile"
    dockerfile.write_text(dockerfile.read_text() + "\n# a change only the second copy has\n")
    return first, second


def plan_json(cwd: Path, *options: str) -> dict:
    result = mlops(cwd, "plan", "prod", "--format", "json", *options)
    assert (result.returncode, result.stderr) == (0, "")
    return {resource["name"]: resource["inputs"] for resource in json.loads(result.stdout)["resources"]}


def test_validate_reads_the_specs_of_the_project_it_runs_in(two_projects):
    first, second = two_projects
    replace(second / "environments" / "prod.yaml", "replicas: 3", "replicas: 1")
    good = mlops(first, "validate", "prod")
    assert (good.returncode, good.stdout, good.stderr) == (0, "ok prod: nothing promoted yet: no serving\n", "")
    # From a subfolder too: the project is the nearest one upwards.
    bad = mlops(second / "images", "validate", "prod")
    assert bad.returncode == 2
    assert bad.stderr == (f"error: {second}/environments/prod.yaml:19: serving.replicas: prod serves each model "
                          "with at least 2 replicas, got 1\n")


def test_plan_reads_the_specs_and_build_contexts_of_the_project_it_runs_in(two_projects):
    first, second = two_projects
    own, other = plan_json(first), plan_json(second)
    assert "cc-ml-0002" in json.dumps(own) and "cc-ml-0999" not in json.dumps(own)
    assert "cc-ml-0999" in json.dumps(other)
    image = "prod-model-registry-image"
    assert own[image]["imageName"] != other[image]["imageName"], "each copy hashes its own build context"
    # --environments of another project: its specs and, its parent being that project, its build contexts.
    assert plan_json(first, "--environments", str(second / "environments")) == other


def test_outside_any_project_every_command_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    nowhere = tmp_path / "nowhere"
    nowhere.mkdir()
    expected = (f"error: not inside an MLOps stack project (no folder with Pulumi.yaml and environments/ from "
                f"{nowhere} upwards); cd into a clone\n")
    monkeypatch.chdir(nowhere)
    for command in (["validate"], ["plan", "prod"], ["diff", "prod@HEAD", "prod"], ["parity", "staging", "prod"],
                    ["train", "--stage", "dev"], ["train", "--stage", "exp-x"]):
        monkeypatch.setattr(sys, "argv", ["mlops", *command])
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        assert (exit_info.value.code, capsys.readouterr().err) == (2, expected), command
    in_a_process = mlops(nowhere, "validate")
    assert (in_a_process.returncode, in_a_process.stdout, in_a_process.stderr) == (2, "", expected)


def test_diff_at_a_revision_compares_the_worktree_it_runs_in(tmp_path):
    if subprocess.run(["git", "-C", str(CHECKOUT), "rev-parse", "HEAD"], check=False, capture_output=True).returncode:
        pytest.skip("needs the git repository of this checkout")
    worktree = tmp_path / "worktree"
    subprocess.run(["git", "-C", str(CHECKOUT), "worktree", "add", "--detach", "--quiet", str(worktree), "HEAD"],
                   check=True, capture_output=True)
    try:
        unchanged = mlops(worktree, "diff", "prod@HEAD", "prod", "--format", "json")
        assert (unchanged.returncode, unchanged.stderr) == (0, "")
        replace(worktree / "environments" / "prod.yaml", SHIPPED_COST_CENTRE, OTHER_COST_CENTRE)
        changed = mlops(worktree, "diff", "prod@HEAD", "prod", "--format", "json")
        assert (changed.returncode, changed.stderr) == (1, "")
        # Only the cost centre label of the worktree's own prod.yaml changed.
        fields = {(field["before"], field["after"]) for change in json.loads(changed.stdout)["changes"]
                  for field in change["fields"]}
        assert fields == {("cc-ml-0002", "cc-ml-0999")}
    finally:
        subprocess.run(["git", "-C", str(CHECKOUT), "worktree", "remove", "--force", str(worktree)],
                       check=True, capture_output=True)
