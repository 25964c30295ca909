"""Render every shipped stage, and the variants that exercise what the shipped files leave off (a promoted
release of iris-classifier, a green with a rollout, sampling, an experiment), with the code of one source tree.

Run as `python tests/stage_renderings.py ROOT ENVIRONMENTS` it imports the components and the program from ROOT
(another revision's checkout) and prints the renderings as JSON, so tests/test_no_move.py can compare the
code of two revisions. Only APIs that both sides share are used: `mlops.plan.render`, `load_stages` (in
`mlops.spec` before the spec became the `mlops_spec` package) and `mlops.experiments.experiment_spec`.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import yaml

SHIPPED = ("dev", "staging", "prod", "cluster")
# Fixed secrets: a Swarm secret's name hashes its content, so both sides must render the same values.
CONFIG = {"mlops:registryPassword": "registry-secret", "mlops:mlflowPassword": "mlflow-secret"}
MODEL = "iris-classifier"
PIN = {"version": 4, "sha256": "3" * 64}
IMAGES = {"training": "localhost:{port}/{stage}/iris-classifier-training@sha256:" + "1" * 64,
          "serving": "localhost:{port}/{stage}/iris-classifier-serving@sha256:" + "2" * 64}
GREEN = {"version": 5, "sha256": "5" * 64}
ROLLOUT = {"steps": [10, 50, 100], "bake_time_s": 60, "max_error_rate_increase": 0.01, "max_p99_latency_ratio": 1.5}
Edit = Callable[[dict[str, Any], bool], None]
"""Edits a stage file's data the same way in either shape of the spec: with `models` (a map of models, the
second argument True) or before it (one `release` and `serving.green`)."""


def _model(data: dict[str, Any]) -> dict[str, Any]:
    return data.setdefault("models", {}).setdefault(MODEL, {})


def released(stage: str, port: int) -> Edit:
    def edit(data: dict[str, Any], models: bool) -> None:
        images = json.loads(json.dumps(IMAGES).replace("{port}", str(port)).replace("{stage}", stage))
        if models:
            _model(data)["release"] = {**PIN, "images": images}
        else:
            data["release"] = {"model": {"name": MODEL, **PIN}, "images": images}
    return edit


def with_green(rollout: bool) -> Edit:
    def edit(data: dict[str, Any], models: bool) -> None:
        policy = {"rollout": copy.deepcopy(ROLLOUT)} if rollout else {}
        traffic = {"blue": 95, "green": 5} if rollout else {"blue": 50, "green": 50}
        if models:
            _model(data).update(green={**GREEN, **policy}, traffic=traffic)
        else:
            data.setdefault("serving", {}).update(green={"model": {"name": MODEL, **GREEN}, **policy}, traffic=traffic)
    return edit


def sampling(data: dict[str, Any], models: bool) -> None:
    data.setdefault("serving", {})["replicas"] = 2
    kept = {"fraction": 0.25, "max_mb": 3}
    if models:
        _model(data)["sampling"] = kept
    else:
        data["serving"]["sampling"] = kept


# name -> (stage file, edits of its YAML)
VARIANTS: dict[str, tuple[str, list[Edit]]] = {
    **{stage: (stage, []) for stage in SHIPPED},
    "staging-released": ("staging", [released("staging", 5101)]),
    "prod-released": ("prod", [released("prod", 5201)]),
    "prod-green-rollout": ("prod", [released("prod", 5201), with_green(rollout=True)]),
    "dev-sampling": ("dev", [sampling]),
    "cluster-green": ("cluster", [with_green(rollout=False)]),
}
EXPERIMENT = "exp-first"


def render_all(root: Path, environments: Path) -> dict[str, list[dict[str, Any]]]:
    sys.path.insert(0, str(root))
    from mlops import plan
    from mlops.experiments import ExperimentSettings, experiment_spec
    # Asked of ROOT itself: the editable install would find this tree's mlops_spec for a revision without one.
    if (root / "mlops_spec").is_dir():
        from mlops_spec.loading import load_stages
    else:  # a revision from before the spec had a package of its own
        from mlops.spec import load_stages  # type: ignore[no-redef, import-not-found]

    # Asked of ROOT's code, as above: whether its stages declare a map of models.
    import mlops_spec.models
    models_map = hasattr(mlops_spec.models, "ModelDeployment")
    renderings = {}
    with tempfile.TemporaryDirectory(prefix="stage-renderings-") as scratch:
        for variant, (stage, edits) in VARIANTS.items():
            folder = Path(scratch) / variant
            shutil.copytree(environments, folder)
            file = folder / f"{stage}.yaml"
            data = yaml.safe_load(file.read_text()) or {}
            for edit in edits:
                edit(data, models_map)
            file.write_text(yaml.safe_dump(data, sort_keys=False))
            spec = load_stages([stage], folder)[0]
            renderings[variant] = plan.render(stage, spec, config=CONFIG, reveal_secrets=True)
        settings = ExperimentSettings.new("first", "alice@example.com", datetime(2026, 3, 1, tzinfo=timezone.utc),
                                          "8h", "dev", ["serving.replicas=2"]).to_config()
        renderings[EXPERIMENT] = plan.render(EXPERIMENT, experiment_spec(EXPERIMENT, settings, environments),
                                             config=CONFIG, reveal_secrets=True)
    return {variant: [dataclasses.asdict(resource) for resource in resources]
            for variant, resources in renderings.items()}


if __name__ == "__main__":
    json.dump(render_all(Path(sys.argv[1]), Path(sys.argv[2])), sys.stdout)
