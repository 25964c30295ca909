"""Input drift as the stage's Prometheus reports it: each replica's PSI per feature against its model's
training data (images/serving/serving/drift.py computes it, components/monitoring.py records the highest per
slot, model version and feature)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mlops.rollout import Query

SCORES = "mlops:drift_psi:max"


@dataclass(frozen=True)
class DriftScore:
    slot: str
    model: str
    model_version: str
    feature: str
    psi: float


def drift_scores(query: Query, model: Optional[str] = None) -> list[DriftScore]:
    """Every feature's score, of `model` alone when given, highest first (a NaN score, from an empty window, is no
    score). A model's name is a DNS label, so it is safe in a PromQL string as it is."""
    selected = SCORES if model is None else f'{SCORES}{{model="{model}"}}'
    scores = [DriftScore(slot=labels.get("slot", "?"), model=labels.get("model", "?"),
                         model_version=labels.get("model_version", "?"), feature=labels.get("feature", "?"), psi=value)
              for labels, value in query(selected) if value == value]
    return sorted(scores, key=lambda score: (-score.psi, score.model, score.slot, score.feature))
