"""The reference profile of a training set, which serving replicas compare live inputs with (PSI).

Per feature: bin edges at the training data's deciles and the share of training rows in each bin; for a
classifier the share of each class among the training labels, for a regressor the same deciles binning of its
training targets (`target_bins`): a bounded number of bins whatever the targets, which serving counts predictions in. A bin holds x with edges[i-1] <= x < edges[i] (numpy's
`searchsorted(edges, x, side="right")`, as serving/drift.py bins); repeated deciles (ties in the data)
collapse into one edge. A bin may still hold no training row (no value between two deciles): the PSI
gives empty bins a small floor share rather than dividing by zero.
"""
from __future__ import annotations

from typing import Any

import numpy as np

QUANTILES = np.linspace(0.1, 0.9, 9)
DIGITS = 6


def decile_bins(values: np.ndarray) -> dict[str, list[float]]:
    edges = np.unique(np.round(np.quantile(values, QUANTILES), DIGITS))
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    return {"edges": edges.tolist(), "proportions": [round(float(count) / len(values), DIGITS) for count in counts]}


def reference_profile(features: np.ndarray, labels: list[str], feature_names: list[str], task: str) -> dict[str, Any]:
    """The profile of the rows a model was trained from; `labels` as the data writes them."""
    profile: dict[str, Any] = {
        "rows": len(labels),
        "features": [{"name": name, **decile_bins(column)} for column, name in zip(features.T, feature_names)],
    }
    if task == "regression":
        profile["target_bins"] = decile_bins(np.array([float(label) for label in labels], dtype=np.float64))
    else:
        classes, class_counts = np.unique(np.array(labels, dtype=str), return_counts=True)
        profile["class_shares"] = {str(label): round(float(count) / len(labels), DIGITS)
                                   for label, count in zip(classes.tolist(), class_counts)}
    return profile
