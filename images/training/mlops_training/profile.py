"""The reference profile of a training set, which serving replicas compare live inputs with (PSI).

Per feature: bin edges at the training data's deciles and the share of training rows in each bin; and the
share of each class among the training labels. A bin holds x with edges[i-1] <= x < edges[i] (numpy's
`searchsorted(edges, x, side="right")`, as serving/drift.py bins); repeated deciles (ties in the data)
collapse into one edge. A bin may still hold no training row (no value between two deciles): the PSI
gives empty bins a small floor share rather than dividing by zero.
"""
from __future__ import annotations

from typing import Any

import numpy as np

QUANTILES = np.linspace(0.1, 0.9, 9)
DIGITS = 6


def reference_profile(features: np.ndarray, labels: np.ndarray, feature_names: list[str]) -> dict[str, Any]:
    profiled = []
    for column, name in zip(features.T, feature_names):
        edges = np.unique(np.round(np.quantile(column, QUANTILES), DIGITS))
        counts = np.bincount(np.searchsorted(edges, column, side="right"), minlength=len(edges) + 1)
        profiled.append({"name": name, "edges": edges.tolist(),
                         "proportions": [round(float(count) / len(column), DIGITS) for count in counts]})
    classes, class_counts = np.unique(labels, return_counts=True)
    return {
        "rows": int(len(labels)),
        "features": profiled,
        "class_shares": {str(label): round(float(count) / len(labels), DIGITS)
                         for label, count in zip(classes.tolist(), class_counts)},
    }
