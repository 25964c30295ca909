"""Which project is worked on: the nearest folder with Pulumi.yaml and environments/, or the one chosen with
`working_on`; and the build contexts of that project."""
from __future__ import annotations

import re
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Iterator, Optional

from mlops_spec.errors import NotInProject, excerpt

PROJECT_FILE = "Pulumi.yaml"
SPECS_FOLDER = "environments"
REPO_ROOT = Path(__file__).resolve().parent.parent
"""The folder holding this `mlops` package: with an editable install, the clone it was installed from. That
clone's tests and benchmarks find its files by it; commands never do: they work on `project_root()`, the
project they are run in, which may be another clone or worktree."""
ENVIRONMENTS_DIR = REPO_ROOT / SPECS_FOLDER
MODELS_FOLDER = "models"
MODEL_PROJECT_FILE = "mlops-model.yaml"
# Folders of the project, named plainly: no absolute path, no `..`, nothing hidden.
BUILD_CONTEXT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*")
MAX_BUILD_CONTEXT = 200

_chosen_project: ContextVar[Optional[Path]] = ContextVar("mlops_project", default=None)


def is_project(folder: Path) -> bool:
    return (folder / PROJECT_FILE).is_file() and (folder / SPECS_FOLDER).is_dir()


def project_root() -> Path:
    """The MLOps stack project being worked on, which holds the specs, the build contexts and the stack files:
    the one chosen with `working_on`, else the nearest folder from the current directory upwards that holds
    Pulumi.yaml and environments/. Asked at every call, never cached, so whoever changes directory (a test, a
    second worktree) gets the project it is in; Pulumi runs `__main__.py` from the project folder."""
    chosen = _chosen_project.get()
    if chosen is not None:
        return chosen
    try:
        start = Path.cwd()
    except FileNotFoundError:
        raise NotInProject(Path(".")) from None
    for folder in (start, *start.parents):
        if is_project(folder):
            return folder
    raise NotInProject(start)


def environments_dir() -> Path:
    """The specs of the project worked on."""
    return project_root() / SPECS_FOLDER


def project_of(environments: Path) -> Path:
    """The project a specs folder belongs to: its parent when that is a project; a loose copy of specs (a test's,
    or one extracted from a git revision) is read against the project worked on."""
    parent = environments.absolute().parent
    return parent if is_project(parent) else project_root()


@contextmanager
def working_on(project: Path) -> Iterator[Path]:
    """Within the block, `project_root()` answers `project`: e.g. the clone an `--environments` folder is in."""
    token = _chosen_project.set(project)
    try:
        yield project
    finally:
        _chosen_project.reset(token)


def build_context_problem(context: str) -> Optional[str]:
    """Why `context` is no build context of the project, or None."""
    if len(context) > MAX_BUILD_CONTEXT or not BUILD_CONTEXT.fullmatch(context):
        return (f"build context '{excerpt(context)}' is not a folder of this project: use a relative path such as "
                "images/training")
    if not (project_root() / context / "Dockerfile").is_file():
        return f"build context '{context}' has no Dockerfile"
    return None


def model_project_file(model: str) -> Path:
    """Where the project file of model `model` is (docs/models.md), relative to the project worked on."""
    return Path(MODELS_FOLDER) / model / MODEL_PROJECT_FILE
