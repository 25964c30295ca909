"""`mlops parity`: stages run the same thing except where `parity.may_differ` of base.yaml allows.

Staging must be a faithful rehearsal of prod: the same serving image digest, training environment,
model and runtime. Only the paths base.yaml lists (ports, replicas, limits, labels...) may differ.
Each stage file could widen its own `parity` rules, so the rules are read from base.yaml alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mlops.diff import ABSENT
from mlops.plan import flatten
from mlops_spec.errors import SpecError
from mlops_spec.loading import load_stages
from mlops_spec.models import ParityRules, StageSpec
from mlops_spec.project import ENVIRONMENTS_DIR
from mlops_spec.yamlsource import load_yaml_source

# What a stage is, not what it runs: these differ between any two stages by definition.
PER_STAGE_FIELDS = {"stage", "kind", "promote_from", "experiment"}


@dataclass(frozen=True)
class Difference:
    path: str
    values: dict[str, Any]  # stage -> value (ABSENT where the stage does not declare the path)
    allowed: bool


def allowed_to_differ(path: str, may_differ: list[str]) -> bool:
    """Prefix match on whole path segments, `*` standing for any one segment (a model's name): `serving.port`
    covers `serving.port.host_port`, not `serving.portal`; `models.*.gates` covers `models.iris.gates.min_metrics`."""
    segments = path.replace("[", ".[").split(".")
    for prefix in may_differ:
        wanted = prefix.split(".")
        if len(wanted) <= len(segments) and all(want in ("*", have) for want, have in zip(wanted, segments)):
            return True
    return False


def parity_rules(environments: Path = ENVIRONMENTS_DIR) -> list[str]:
    base = load_yaml_source(environments / "base.yaml")
    try:
        return ParityRules.model_validate(base.data.get("parity") or {}).may_differ
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(["parity", *(str(part) for part in first["loc"])])
        file, line = base.locate(tuple(field.split(".")))
        raise SpecError(file=file, field=field, message=first["msg"], line=line) from None


def spec_paths(spec: StageSpec) -> dict[str, Any]:
    flat = flatten(spec.model_dump(mode="json", exclude=PER_STAGE_FIELDS, exclude_none=True))
    # Each stage pulls promoted images from its own registry, so only the digest says what it runs.
    for path, ref in spec.promoted_image_pins().items():
        flat[path] = ref.partition("@")[2] or ref
    return flat


def compare_stages(specs: list[StageSpec], may_differ: list[str]) -> list[Difference]:
    flattened = {spec.stage: spec_paths(spec) for spec in specs}
    paths = sorted({path for flat in flattened.values() for path in flat})
    differences = []
    for path in paths:
        values = {stage: flat.get(path, ABSENT) for stage, flat in flattened.items()}
        distinct = {repr(value) for value in values.values()}
        if len(distinct) > 1:
            differences.append(Difference(path, values, allowed_to_differ(path, may_differ)))
    return differences


def check_parity(stages: list[str], environments: Path = ENVIRONMENTS_DIR) -> list[Difference]:
    if len(set(stages)) < 2:
        raise SpecError(file=environments, field="", message="parity compares at least two different stages, "
                                                             "e.g. `mlops parity staging prod`")
    return compare_stages(load_stages(stages, environments), parity_rules(environments))
