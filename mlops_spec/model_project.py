"""A model project: the team's code for one model, `models/<name>/`, with its hashed lock and its project file
`mlops-model.yaml` (docs/models.md). The platform builds the model's training and serving images from it and runs
its entrypoint with a fixed interface; these checks refuse, in one line naming the file (and line), a project the
platform could not build, train or serve.
"""
from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mlops_spec.errors import SpecError, excerpt
from mlops_spec.loading import spec_error_from_validation
from mlops_spec.models import DNS_LABEL, MAX_DNS_LABEL
from mlops_spec.project import MODEL_PROJECT_FILE, MODELS_FOLDER, model_project_file, project_root
from mlops_spec.yamlsource import load_yaml_source

LOCK_FILE = "requirements.lock"
PLATFORM_LOCKS = ("images/training/requirements.lock", "images/serving/requirements-oip.lock",
                  "images/serving/requirements-mlserver.lock")
"""The locks of the platform images a model's lock is installed on top of: one venv, so one version per package."""
COMPILE_HINT = ("compile it against the platform's locks: uv pip compile requirements.in --generate-hashes "
                "--python-version 3.11 --python-platform x86_64-manylinux_2_28 "
                + " ".join(f"-c {lock}" for lock in PLATFORM_LOCKS))
MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
QUALIFIED_TYPE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+")
# A column name is written into CSV headers and metric labels as it is: printable, no separator or quote.
COLUMN_NAME = re.compile(r"[^\s,\"'][^,\"'\x00-\x1f]{0,126}[^\s,\"']|[^\s,\"']")
DATA_PATH = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*")
REQUIREMENT = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;\\]+)")
FEATURE_TYPES = ("float", "int")
LABEL_TYPES = {"classification": ("int", "str"), "regression": ("float",)}
JsonValue = Any


class ProjectModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Column(ProjectModel):
    name: str = Field(pattern=COLUMN_NAME.pattern, description="as in the data's header")
    type: Literal["float", "int", "str"]


class InputSchema(ProjectModel):
    features: list[Column] = Field(min_length=1, description="in the order the model takes them")
    label: Column

    @model_validator(mode="after")
    def _distinct_names(self) -> "InputSchema":
        names = [column.name for column in self.features]
        for column in self.features:
            if column.type not in FEATURE_TYPES:
                raise ValueError(f"feature '{column.name}' has type {column.type}; a feature is one of "
                                 f"{', '.join(FEATURE_TYPES)}")
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"feature names must be distinct: {', '.join(repeated)} repeated")
        if self.label.name in names:
            raise ValueError(f"the label '{self.label.name}' is also a feature")
        return self

    @property
    def header(self) -> list[str]:
        """What the data's first line says: the features in model input order, then the label."""
        return [*(column.name for column in self.features), self.label.name]


class SkopsLoading(ProjectModel):
    """The model is served from skops's format, never unpickled by a replica (docs/contracts.md)."""
    trusted_types: list[Annotated[str, Field(pattern=QUALIFIED_TYPE.pattern)]] = Field(
        default_factory=list, description="types beyond skops's defaults the model holds, each reviewed, as "
                                          "skops.io.get_untrusted_types names them (module.Type)")

    @model_validator(mode="after")
    def _distinct_types(self) -> "SkopsLoading":
        repeated = sorted({name for name in self.trusted_types if self.trusted_types.count(name) > 1})
        if repeated:
            raise ValueError(f"trusted types must be distinct: {', '.join(repeated)} repeated")
        return self


class ModelProject(ProjectModel):
    task: Literal["classification", "regression"]
    entrypoint: str = Field(pattern=MODULE.pattern, description="a module of the project, run as python -m")
    params: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")], JsonValue] = Field(
        default_factory=dict, description="default parameters; `mlops train --param k=v` overrides")
    default_data: str = Field(pattern=DATA_PATH.pattern, description="CSV in the project, header = features + label")
    input_schema: InputSchema = Field(alias="schema")
    skops: Optional[SkopsLoading] = Field(default=None, description="absent: replicas unpickle model.pkl")

    @model_validator(mode="after")
    def _label_fits_the_task(self) -> "ModelProject":
        allowed = LABEL_TYPES[self.task]
        if self.input_schema.label.type not in allowed:
            raise ValueError(f"a {self.task} label has type {' or '.join(allowed)}, got "
                             f"{self.input_schema.label.type}")
        return self


@dataclass(frozen=True)
class LockedPackage:
    name: str
    version: str
    line: int
    hashed: bool


def canonical_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_packages(lock: Path) -> dict[str, LockedPackage]:
    """The `name==version` requirements of a pip lock by canonical name, with the line each starts on and whether
    a `--hash` follows it."""
    packages: dict[str, LockedPackage] = {}
    current: Optional[LockedPackage] = None
    for number, raw in enumerate(lock.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if match := REQUIREMENT.match(line):
            current = LockedPackage(canonical_name(match[1]), match[3], number, "--hash=" in line)
        elif current is not None and line.startswith("--hash="):
            current = LockedPackage(current.name, current.version, current.line, True)
        else:
            continue
        packages[current.name] = current
    return packages


def project_folder(name: str) -> Path:
    return project_root() / MODELS_FOLDER / name


def project_names() -> list[str]:
    """Every model project of the project worked on: the folders of models/ with a project file."""
    folder = project_root() / MODELS_FOLDER
    return sorted(path.parent.name for path in folder.glob(f"*/{MODEL_PROJECT_FILE}"))


def load_model_project(name: str) -> ModelProject:
    """The project of model `name`, checked whole; SpecError names the first problem, its file and line."""
    folder = project_folder(name)
    relative = model_project_file(name)
    file = project_root() / relative
    if len(name) > MAX_DNS_LABEL or not DNS_LABEL.fullmatch(name):
        raise SpecError(file=relative.parent, field="", message=f"'{excerpt(name)}' is not a model name: lowercase "
                                                                "letters, digits and '-', starting with a letter, at "
                                                                f"most {MAX_DNS_LABEL} characters (a DNS label)")
    if not file.is_file():
        raise SpecError(file=relative, field="", message=f"no project for model '{name}': create {relative} "
                                                         "(docs/models.md)")
    source = load_yaml_source(file)
    source.file = relative
    try:
        project = ModelProject.model_validate(source.data)
    except ValidationError as err:
        raise spec_error_from_validation(err, source, ModelProject) from None
    _check_entrypoint(folder, relative, source.lines, project)
    _check_default_data(folder, relative, source.lines, project)
    _check_lock(folder, relative.parent / LOCK_FILE)
    return project


def _check_entrypoint(folder: Path, file: Path, lines: dict, project: ModelProject) -> None:
    module = folder.joinpath(*project.entrypoint.split("."))
    if not (module.with_suffix(".py").is_file() or (module / "__main__.py").is_file()):
        raise SpecError(file=file, field="entrypoint", line=lines.get(("entrypoint",)),
                        message=f"module {project.entrypoint} is not in the project: add "
                                f"{module.relative_to(folder).as_posix()}.py")


def _check_default_data(folder: Path, file: Path, lines: dict, project: ModelProject) -> None:
    data = folder / project.default_data
    line = lines.get(("default_data",))
    if not data.is_file():
        raise SpecError(file=file, field="default_data", line=line,
                        message=f"{project.default_data} is not a file of the project")
    with data.open(encoding="utf-8", errors="replace", newline="") as stream:
        header = [column.strip() for column in next(csv.reader(stream), [])]
    expected = project.input_schema.header
    if header != expected:
        raise SpecError(file=file, field="default_data", line=line, message=f"the header of {project.default_data} must be the schema's features then "
                                         f"its label: {','.join(expected)}; got {excerpt(','.join(header))}")


def _check_lock(folder: Path, lock: Path) -> None:
    if not (folder / LOCK_FILE).is_file():
        raise SpecError(file=lock, field="", message=f"the project has no {LOCK_FILE}: list its packages in "
                                                     f"requirements.in and {COMPILE_HINT}")
    packages = locked_packages(folder / LOCK_FILE)
    for package in packages.values():
        if not package.hashed:
            raise SpecError(file=lock, field="", line=package.line,
                            message=f"{package.name}=={package.version} has no --hash: images install by hash "
                                    f"only; {COMPILE_HINT}")
    for platform_lock in PLATFORM_LOCKS:
        pinned = locked_packages(project_root() / platform_lock)
        for package in packages.values():
            platform = pinned.get(package.name)
            if platform is not None and platform.version != package.version:
                raise SpecError(file=lock, field="", line=package.line,
                                message=f"pins {package.name}=={package.version} but {platform_lock} pins "
                                        f"{package.name}=={platform.version}, and both are installed into one venv; "
                                        f"{COMPILE_HINT}")
