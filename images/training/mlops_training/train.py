"""Deterministic training: the same data, parameters, seed and environment give a byte-identical model.pkl.

The data is scikit-learn's built-in iris set, or a dataset of the stage's datasets volume (mlops_training/datasets.py)
named by the request; the manifest names either, with the sha256 of the arrays fitted on.

Randomness comes only from `seed` (subset, held-out split and estimator), the estimator runs on one
thread, and the pipeline is pickled with a fixed protocol, so the model's sha256 identifies the model.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils._param_validation import InvalidParameterError

from mlops_training.datasets import DATASETS_DIR, FEATURE_NAMES, DatasetError, load
from mlops_training.profile import reference_profile

DEFAULT_MODEL_NAME = "iris-classifier"
BUILT_IN_DATASET = "sklearn.datasets.load_iris"
HELD_OUT_FRACTION = 0.25
PICKLE_PROTOCOL = 5
CODE_DIR = Path(__file__).resolve().parent
# n_jobs is pickled with the model: fixed, the model's bytes do not depend on how many cores a run used.
FIXED_ESTIMATOR_PARAMS = {"n_jobs": 1}


class TrainingError(ValueError):
    """A bad training input, reported to the user as one line."""


@dataclass(frozen=True)
class TrainingRequest:
    seed: int = 0
    subset: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)
    model_name: str = DEFAULT_MODEL_NAME
    dataset: str | None = None
    """A dataset of the datasets volume (`latest`, or its sha256); None: the built-in iris data."""

    def __post_init__(self) -> None:
        """Reject bad inputs before any work, so a run either fails at once or trains."""
        if not 0 <= self.seed < 2**32:
            raise TrainingError(f"--seed must be in [0, 2**32), got {self.seed}")
        if not 0 < self.subset <= 1:
            raise TrainingError(f"--subset must be a fraction in (0, 1], got {self.subset}")
        new_estimator(self)


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


def new_estimator(request: TrainingRequest) -> RandomForestClassifier:
    estimator = RandomForestClassifier(random_state=request.seed, **FIXED_ESTIMATOR_PARAMS)
    allowed = sorted(set(estimator.get_params()) - {"random_state", *FIXED_ESTIMATOR_PARAMS})
    unknown = sorted(set(request.params) - set(allowed))
    if unknown:
        raise TrainingError(f"unknown parameter(s) {', '.join(unknown)} for RandomForestClassifier; "
                            f"allowed: {', '.join(allowed)} (the seed is set with --seed)")
    return estimator.set_params(**request.params)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def code_version() -> str:
    """sha256 over the training code files, so a manifest names the exact code that trained the model."""
    digest = hashlib.sha256()
    for path in sorted(CODE_DIR.rglob("*.py")):
        digest.update(str(path.relative_to(CODE_DIR)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def data_sha256(features: np.ndarray, labels: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in (features, labels):
        contiguous = np.ascontiguousarray(array)
        digest.update(f"{contiguous.dtype.str}{contiguous.shape}".encode())
        digest.update(contiguous.tobytes())
    return digest.hexdigest()


def environment() -> dict[str, str | None]:
    """The training image digest is only known outside the image, so `mlops train` passes it in."""
    lock_file = os.environ.get("TRAINING_LOCK_FILE")
    return {
        "image_digest": os.environ.get("TRAINING_IMAGE_DIGEST"),
        "lock_sha256": sha256_file(Path(lock_file)) if lock_file else None,
    }


def select_subset(features: np.ndarray, labels: np.ndarray, request: TrainingRequest) -> tuple[np.ndarray, np.ndarray]:
    if request.subset == 1:
        return features, labels
    try:
        subset_features, _, subset_labels, _ = train_test_split(
            features, labels, train_size=request.subset, stratify=labels, random_state=request.seed)
    except ValueError as err:
        raise TrainingError(f"--subset {request.subset} is too small to keep every class: {err}") from None
    return subset_features, subset_labels


def training_data(request: TrainingRequest, datasets_dir: Path) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """Features, labels and how the manifest names them."""
    if request.dataset is None:
        iris = load_iris()
        return iris.data, iris.target, {"dataset": BUILT_IN_DATASET}
    try:
        dataset = load(request.dataset, datasets_dir)
    except DatasetError as err:
        raise TrainingError(str(err)) from None
    return dataset.features, dataset.labels, {"dataset": dataset.name, "dataset_sha256": dataset.sha256}


def train(request: TrainingRequest, output_dir: Path, datasets_dir: Path = DATASETS_DIR) -> TrainingResult:
    """Fit the pipeline, then write `model.pkl` and `manifest.json` (inputs, environment, outputs) to `output_dir`."""
    estimator = new_estimator(request)
    all_features, all_labels, named = training_data(request, datasets_dir)
    features, labels = select_subset(all_features, all_labels, request)
    try:
        train_features, test_features, train_labels, test_labels = train_test_split(
            features, labels, test_size=HELD_OUT_FRACTION, stratify=labels, random_state=request.seed)
    except ValueError as err:
        raise TrainingError(f"--subset {request.subset} leaves too few samples for a held-out split: {err}") from None
    pipeline = Pipeline([("scale", StandardScaler()), ("classify", estimator)])
    try:
        pipeline.fit(train_features, train_labels)
    except InvalidParameterError as err:
        raise TrainingError(f"invalid --param: {err}") from None
    predictions = pipeline.predict(test_features)
    metrics = {
        "accuracy": round(float(accuracy_score(test_labels, predictions)), 6),
        "f1_macro": round(float(f1_score(test_labels, predictions, average="macro")), 6),
    }

    output_dir.mkdir(parents=True, exist_ok=True)
    model_path = output_dir / "model.pkl"
    model_path.write_bytes(pickle.dumps(pipeline, protocol=PICKLE_PROTOCOL))
    manifest = {
        "model_name": request.model_name,
        "inputs": {
            **named,
            "data_sha256": data_sha256(all_features, all_labels),
            "subset": request.subset,
            "seed": request.seed,
            "params": dict(sorted(request.params.items())),
            "estimator": type(estimator).__name__,
            "code_version": code_version(),
            "train_samples": int(len(train_labels)),
            "held_out_samples": int(len(test_labels)),
        },
        "environment": environment(),
        "outputs": {"model_sha256": sha256_file(model_path), "metrics": metrics},
        # What the model was fitted on, which serving replicas score live inputs against (input drift).
        "reference_profile": reference_profile(train_features, train_labels, list(FEATURE_NAMES)),
    }
    manifest_path = output_dir / "manifest.json"
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return TrainingResult(model_path=model_path, manifest_path=manifest_path, manifest=manifest)
