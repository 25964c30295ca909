"""The platform's side of a training run: everything but the fitting, which is the team's (docs/models.md).

It resolves the data (the project's default data, or a dataset of the datasets volume) and checks it against the
project's schema; runs the project's entrypoint as
`python -m <entrypoint> --data CSV --output-dir DIR --seed N --subset F --params JSON`; checks what it wrote
(`model.pkl` unpickles to something whose `predict` takes one row of the schema's width, `metrics.json` is a flat
object of finite numbers); where the project asks for skops, writes `model.skops` from it (skops_model.py); then
hashes the model and writes the manifest. Every failure is a `TrainingError`, one
line; nothing is registered after one.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlops_training.datasets import DATASETS_DIR, Dataset, DatasetError, RowRules, load, model_folder, read
from mlops_training.profile import reference_profile
from mlops_training.project import Project
from mlops_training.skops_model import SkopsRefused, skops_bytes

MODEL_FILE = "model.pkl"
METRICS_FILE = "metrics.json"
MANIFEST_FILE = "manifest.json"
# Copies of mlops_spec.contract's (tests/test_contract.py checks them).
SKOPS_FILE = "model.skops"
SKOPS_OUTPUT = "skops"
# The skops form must predict these first training rows as the pickle does: enough to catch a model skops rebuilt
# differently, without adding a large run's whole prediction time to it.
SKOPS_CHECK_ROWS = 1000


class TrainingError(ValueError):
    """A bad training input or output, reported to the user as one line."""


@dataclass(frozen=True)
class TrainingRequest:
    seed: int = 0
    subset: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)
    """Overrides of the project's default parameters."""
    dataset: str | None = None
    """A dataset of the datasets volume (`latest`, or its sha256); None: the project's default data."""

    def __post_init__(self) -> None:
        """Reject bad inputs before any work, so a run either fails at once or trains."""
        if not 0 <= self.seed < 2**32:
            raise TrainingError(f"--seed must be in [0, 2**32), got {self.seed}")
        if not 0 < self.subset <= 1:
            raise TrainingError(f"--subset must be a fraction in (0, 1], got {self.subset}")


@dataclass(frozen=True)
class TrainingResult:
    model_path: Path
    manifest_path: Path
    manifest: dict[str, Any]

    @property
    def model_sha256(self) -> str:
        return self.manifest["outputs"]["model_sha256"]

    @property
    def metrics(self) -> dict[str, float]:
        return self.manifest["outputs"]["metrics"]

    @property
    def files(self) -> list[Path]:
        """What the run registers: the model, its skops form where the project asked for one, the manifest."""
        skops = [self.model_path.with_name(SKOPS_FILE)] if SKOPS_OUTPUT in self.manifest["outputs"] else []
        return [self.model_path, *skops, self.manifest_path]


def parse_param(assignment: str) -> tuple[str, Any]:
    """`key=value` with the value read as JSON when it parses (3, 0.5, true, null), else as a string."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise TrainingError(f"--param '{assignment}' is not key=value")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def training_data(project: Project, request: TrainingRequest, datasets_dir: Path) -> tuple[Dataset, dict[str, str]]:
    """The data checked against the project's schema, and how the manifest names it: the project's default data,
    or a dataset of the project's own folder of the datasets volume mounted at `datasets_dir`."""
    rules = RowRules.of(project)
    try:
        if request.dataset is None:
            data = read(project.default_data, project.default_data.read_bytes(), rules)
            return data, {"dataset": project.default_data.relative_to(project.directory).as_posix()}
        data = load(request.dataset, rules, model_folder(project, datasets_dir))
    except DatasetError as err:
        where = project.default_data.name if request.dataset is None else f"dataset {request.dataset}"
        raise TrainingError(f"{where}: {err}") from None
    return data, {"dataset": data.name, "dataset_sha256": data.sha256}


def run_entrypoint(project: Project, data: Path, output_dir: Path, request: TrainingRequest,
                   params: dict[str, Any]) -> None:
    """The team's code, in a process of its own with the project on its path; its output goes to ours."""
    command = [sys.executable, "-m", project.entrypoint, "--data", str(data), "--output-dir", str(output_dir),
               "--seed", str(request.seed), "--subset", repr(request.subset), "--params", json.dumps(params)]
    path = os.pathsep.join(filter(None, [str(project.directory), os.environ.get("PYTHONPATH")]))
    # No bytecode next to the team's code: the project's files are hashed (the image's tag, the code_version).
    completed = subprocess.run(command, cwd=project.directory, check=False,
                               env={**os.environ, "PYTHONPATH": path, "PYTHONDONTWRITEBYTECODE": "1"})
    if completed.returncode != 0:
        raise TrainingError(f"{project.entrypoint} exited with code {completed.returncode}; nothing was registered")


def checked_model(project: Project, model_path: Path, example: np.ndarray) -> Any:
    """`model.pkl` is a fitted model the serving replica can use: it unpickles (with the project importable, as
    in the serving image), and its `predict` takes one row of the schema's width."""
    if not model_path.is_file():
        raise TrainingError(f"{project.entrypoint} wrote no {MODEL_FILE} to its --output-dir; nothing was registered")
    if str(project.directory) not in sys.path:
        sys.path.insert(0, str(project.directory))
    writes_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        model = pickle.loads(model_path.read_bytes())
    except Exception as err:  # noqa: BLE001 - whatever unpickling raises, the file is no model
        raise TrainingError(f"{MODEL_FILE} does not unpickle ({type(err).__name__}: {err}); nothing was "
                            "registered") from None
    finally:
        sys.dont_write_bytecode = writes_bytecode
    if not callable(getattr(model, "predict", None)):
        raise TrainingError(f"{MODEL_FILE} holds a {type(model).__name__}, which has no predict(); nothing was "
                            "registered")
    try:
        predicted = np.asarray(model.predict(example))
    except Exception as err:  # noqa: BLE001 - the team's model may raise anything on a row it cannot take
        raise TrainingError(f"{MODEL_FILE} cannot predict one row of the schema's {example.shape[1]} features "
                            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); nothing was "
                            "registered") from None
    if predicted.shape[:1] != (1,):
        raise TrainingError(f"{MODEL_FILE} predicted {predicted.shape} for one row, not one value; nothing was "
                            "registered")
    return model


def written_skops(project: Project, model: Any, rows: np.ndarray, output_dir: Path) -> dict[str, Any] | None:
    """Where the project asks for skops: `model.skops` written next to the pickle, and how the manifest describes
    it (its sha256 and the types beyond skops's defaults a replica must trust to load it)."""
    if project.skops_trusted_types is None:
        return None
    try:
        data = skops_bytes(model, list(project.skops_trusted_types), rows)
    except SkopsRefused as refusal:
        raise TrainingError(f"{SKOPS_FILE}: {refusal}; nothing was registered") from None
    (output_dir / SKOPS_FILE).write_bytes(data)
    return {"sha256": hashlib.sha256(data).hexdigest(), "trusted_types": sorted(project.skops_trusted_types)}


def checked_metrics(path: Path) -> dict[str, float]:
    """`metrics.json`: a flat JSON object of finite numbers."""
    if not path.is_file():
        raise TrainingError(f"no {METRICS_FILE} in the --output-dir; nothing was registered")
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TrainingError(f"{METRICS_FILE} is not JSON ({err}); nothing was registered") from None
    if not isinstance(metrics, dict) or not metrics:
        raise TrainingError(f"{METRICS_FILE} must be a JSON object of metric names to numbers; nothing was registered")
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TrainingError(f"{METRICS_FILE}: '{name}' is {json.dumps(value)[:80]}, not a finite number; "
                                "nothing was registered")
    return {name: float(value) for name, value in metrics.items()}


def environment(project: Project) -> dict[str, str | None]:
    """The training image digest is only known outside the image, so `mlops train` passes it in."""
    platform_lock = os.environ.get("TRAINING_LOCK_FILE")
    return {
        "image_digest": os.environ.get("TRAINING_IMAGE_DIGEST"),
        "lock_sha256": project.lock_sha256(),
        "platform_lock_sha256": sha256_file(Path(platform_lock)) if platform_lock else None,
    }


def train(project: Project, request: TrainingRequest, output_dir: Path,
          datasets_dir: Path = DATASETS_DIR) -> TrainingResult:
    """Run the project's entrypoint on the resolved data, check its outputs, then write `manifest.json` (inputs,
    environment, outputs, schema, reference profile) next to `model.pkl` (and `model.skops`) in `output_dir`."""
    data, named = training_data(project, request, datasets_dir)
    params = {**project.params, **request.params}
    output_dir.mkdir(parents=True, exist_ok=True)
    run_entrypoint(project, data.path, output_dir, request, params)
    model_path = output_dir / MODEL_FILE
    model = checked_model(project, model_path, data.features[:1])
    metrics = checked_metrics(output_dir / METRICS_FILE)
    skops = written_skops(project, model, data.features[:SKOPS_CHECK_ROWS], output_dir)
    manifest = {
        "model_name": project.name,
        "task": project.task,
        "schema": project.schema,
        "inputs": {
            **named,
            "data_sha256": data.sha256,
            "subset": request.subset,
            "seed": request.seed,
            "params": dict(sorted(params.items())),
            "entrypoint": project.entrypoint,
            "code_version": project.code_sha256(),
            "rows": len(data.labels),
        },
        "environment": environment(project),
        "outputs": {"model_sha256": sha256_file(model_path), "metrics": metrics,
                    **({SKOPS_OUTPUT: skops} if skops else {})},
        # The data the run was given, which serving replicas score live inputs (and predictions) against.
        "reference_profile": reference_profile(data.features, data.labels,
                                               [column.name for column in project.features], project.task),
    }
    manifest_path = output_dir / MANIFEST_FILE
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return TrainingResult(model_path=model_path, manifest_path=manifest_path, manifest=manifest)
