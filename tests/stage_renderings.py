"""Render every shipped stage, and the variants that exercise what the shipped files leave off (a promoted
release, green with a rollout, sampling, an experiment), with the code of one source tree.

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
RELEASE = {"model": {"name": "iris-classifier", "version": 4, "sha256": "3" * 64},
           "images": {"training": "localhost:{port}/{stage}/training@sha256:" + "1" * 64,
                      "serving": "localhost:{port}/{stage}/serving@sha256:" + "2" * 64}}
GREEN = {"model": {"name": "iris-classifier", "version": 5, "sha256": "5" * 64}}
ROLLOUT = {"steps": [10, 50, 100], "bake_time_s": 60, "max_error_rate_increase": 0.01, "max_p99_latency_ratio": 1.5}
Edit = Callable[[dict[str, Any]], None]


def released(stage: str, port: int) -> Edit:
    def edit(data: dict[str, Any]) -> None:
        data["release"] = json.loads(json.dumps(RELEASE).replace("{port}", str(port)).replace("{stage}", stage))
    return edit


def with_green(rollout: bool) -> Edit:
    def edit(data: dict[str, Any]) -> None:
        serving = data.setdefault("serving", {})
        serving["green"] = {**copy.deepcopy(GREEN), **({"rollout": ROLLOUT} if rollout else {})}
        serving["traffic"] = {"blue": 95, "green": 5} if rollout else {"blue": 50, "green": 50}
    return edit


def sampling(data: dict[str, Any]) -> None:
    data.setdefault("serving", {}).update(replicas=2, sampling={"fraction": 0.25, "max_mb": 3})


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

    renderings = {}
    with tempfile.TemporaryDirectory(prefix="stage-renderings-") as scratch:
        for variant, (stage, edits) in VARIANTS.items():
            folder = Path(scratch) / variant
            shutil.copytree(environments, folder)
            file = folder / f"{stage}.yaml"
            data = yaml.safe_load(file.read_text()) or {}
            for edit in edits:
                edit(data)
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
