"""Input drift as the stage's Prometheus reports it: each replica's PSI per feature against its model's
training data (images/serving/serving/drift.py computes it, components/monitoring.py records the highest per
slot, model version and feature)."""
from __future__ import annotations

from dataclasses import dataclass

from mlops.rollout import Query

SCORES = "mlops:drift_psi:max"


@dataclass(frozen=True)
class DriftScore:
    slot: str
    model: str
    model_version: str
    feature: str
    psi: float


def drift_scores(query: Query) -> list[DriftScore]:
    """Every feature's score, highest first (a NaN score, from an empty window, is no score)."""
    scores = [DriftScore(slot=labels.get("slot", "?"), model=labels.get("model", "?"),
                         model_version=labels.get("model_version", "?"), feature=labels.get("feature", "?"), psi=value)
              for labels, value in query(SCORES) if value == value]
    return sorted(scores, key=lambda score: (-score.psi, score.slot, score.feature))
