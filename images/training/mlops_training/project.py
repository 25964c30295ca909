"""The model project baked into a model's training image (`/opt/model/code`, MODEL_PROJECT_DIR): its project file
as the runner reads it. `mlops validate` has checked the file whole (mlops_spec/model_project.py) before the image
was built; the runner reads only what it uses, and says in one line when that is not there."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PROJECT_DIR_VARIABLE = "MODEL_PROJECT_DIR"
MODEL_NAME_VARIABLE = "MODEL_NAME"
PROJECT_FILE = "mlops-model.yaml"
LOCK_FILE = "requirements.lock"
# What is not the team's code: bytecode the interpreter may leave, and the wheels a build installs from.
NOT_CODE = ("__pycache__", "wheels")


class ProjectError(ValueError):
    """A project the runner cannot use; one line."""


@dataclass(frozen=True)
class Column:
    name: str
    type: str


@dataclass(frozen=True)
class Project:
    directory: Path
    name: str
    task: str
    entrypoint: str
    default_data: Path
    features: tuple[Column, ...]
    label: Column
    params: dict[str, Any] = field(default_factory=dict)
    skops_trusted_types: tuple[str, ...] | None = None
    """None: replicas load the pickle; else they load model.skops, trusting skops's defaults and these types."""

    @property
    def header(self) -> list[str]:
        return [*(column.name for column in self.features), self.label.name]

    @property
    def schema(self) -> dict[str, Any]:
        return {"features": [{"name": column.name, "type": column.type} for column in self.features],
                "label": {"name": self.label.name, "type": self.label.type}}

    def code_sha256(self) -> str:
        """sha256 over the project's files (path and content), so a manifest names the exact code that trained."""
        digest = hashlib.sha256()
        for path in sorted(self.directory.rglob("*")):
            relative = path.relative_to(self.directory)
            if path.is_file() and not set(relative.parts) & set(NOT_CODE):
                digest.update(relative.as_posix().encode() + b"\0")
                digest.update(hashlib.sha256(path.read_bytes()).digest())
        return digest.hexdigest()

    def lock_sha256(self) -> str | None:
        lock = self.directory / LOCK_FILE
        return hashlib.sha256(lock.read_bytes()).hexdigest() if lock.is_file() else None


def _column(entry: Any, where: str) -> Column:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(entry.get("type"), str):
        raise ProjectError(f"{PROJECT_FILE}: {where} must be {{name: ..., type: ...}}")
    return Column(entry["name"], entry["type"])


def _skops_trusted_types(section: Any) -> tuple[str, ...] | None:
    if section is None:
        return None
    types = section.get("trusted_types", []) if isinstance(section, dict) else None
    if not isinstance(types, list) or not all(isinstance(name, str) for name in types):
        raise ProjectError(f"{PROJECT_FILE}: skops.trusted_types must be a list of type names")
    return tuple(types)


def load_project(directory: Path | None = None, name: str | None = None) -> Project:
    """The project in `directory` (default: $MODEL_PROJECT_DIR), named `name` (default: $MODEL_NAME, else the
    folder's name)."""
    configured = os.environ.get(PROJECT_DIR_VARIABLE)
    if directory is None and not configured:
        raise ProjectError(f"this image holds no model project (${PROJECT_DIR_VARIABLE} is unset): train in a model's "
                           "training image, which the stack builds from models/<name>/ (docs/models.md)")
    directory = Path(directory or configured or ".").resolve()
    file = directory / PROJECT_FILE
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as err:
        raise ProjectError(f"{file} cannot be read: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ProjectError(f"{file} is not valid YAML: {str(err).splitlines()[0]}") from None
    try:
        schema = data["schema"]
        features = tuple(_column(entry, f"schema.features[{index}]") for index, entry in enumerate(schema["features"]))
        return Project(directory=directory, name=name or os.environ.get(MODEL_NAME_VARIABLE) or directory.name,
                       task=str(data["task"]), entrypoint=str(data["entrypoint"]),
                       default_data=directory / str(data["default_data"]), features=features,
                       label=_column(schema["label"], "schema.label"), params=dict(data.get("params") or {}),
                       skops_trusted_types=_skops_trusted_types(data.get("skops")))
    except (KeyError, TypeError) as err:
        raise ProjectError(f"{file} lacks {err} (mlops validate checks the whole file)") from None
