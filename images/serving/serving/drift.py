"""Input drift: how far the rows a replica predicted lately are from its model's training data.

The training run records a reference profile in the model's manifest (mlops_training/profile.py): per
feature, bin edges and the share of training rows in each bin, and the class balance. The replica keeps
the bins of its last `window_rows` rows in a ring buffer with running counts, so recording a request costs
one `searchsorted` per feature, and computes each feature's population stability index only when scraped:

    PSI = sum over bins (live share - reference share) * ln(live share / reference share)

0 means the same distribution; rules of thumb read 0.1 as a shift worth a look and 0.25 as a large one.
Rows drawn from the training distribution score about (bins - 1) / window_rows from sampling noise alone.
"""
from __future__ import annotations

import threading
from typing import Any, Iterator

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# Shares below this count as this much, so an empty bin on either side weighs heavily but stays finite.
FLOOR_SHARE = 1e-4
# Below this many rows a PSI is mostly noise: none is exported yet.
MIN_ROWS = 100


class ProfileError(ValueError):
    pass


class DriftMonitor(Collector):
    """Scores the recent rows against `profile` and counts predictions; a prometheus_client collector of
    `mlops_drift_psi{feature}`, `mlops_drift_window_rows`, `mlops_predictions_total{prediction}` and
    `mlops_reference_prediction_share{prediction}` (the training data's class balance)."""

    def __init__(self, profile: dict[str, Any], n_features: int, window_rows: int) -> None:
        try:
            features = profile["features"]
            self.edges = [np.asarray(feature["edges"], dtype=np.float64) for feature in features]
            proportions = [np.asarray(feature["proportions"], dtype=np.float64) for feature in features]
            self.class_shares = {str(label): float(share) for label, share in profile.get("class_shares", {}).items()}
        except (KeyError, TypeError, ValueError) as error:
            raise ProfileError(f"the manifest's reference_profile is malformed: {error!r}") from None
        if len(features) != n_features:
            raise ProfileError(f"the reference profile describes {len(features)} features, the model takes {n_features}")
        if any(len(shares) != len(edges) + 1 for shares, edges in zip(proportions, self.edges)):
            raise ProfileError("each profiled feature needs one proportion more than it has bin edges")
        self.bins = max(len(shares) for shares in proportions)
        self.reference = np.full((n_features, self.bins), FLOOR_SHARE)
        for feature, shares in enumerate(proportions):
            self.reference[feature, :len(shares)] = np.maximum(shares, FLOOR_SHARE)
        self.window_rows = window_rows
        self.window = np.zeros((window_rows, n_features), dtype=np.int16)
        self.counts = np.zeros((n_features, self.bins), dtype=np.int64)
        self.filled = 0
        self.position = 0
        self.predictions: dict[str, int] = {}
        self.lock = threading.Lock()

    def observe(self, rows: np.ndarray, predictions: np.ndarray) -> None:
        """Add a batch of rows (2-D, one column per feature) to the window, dropping the oldest, and count
        its predictions."""
        values, value_counts = np.unique(predictions, return_counts=True)
        rows = rows[-self.window_rows:]
        binned = np.column_stack([np.searchsorted(edges, rows[:, feature], side="right")
                                  for feature, edges in enumerate(self.edges)]).astype(np.int16)
        columns = np.arange(binned.shape[1])
        with self.lock:
            slots = (self.position + np.arange(len(binned))) % self.window_rows
            overwritten = min(len(binned), self.filled + len(binned) - self.window_rows)
            if overwritten > 0:
                # Until the window is full its free slots come first (at `position` onwards); past them the
                # batch wraps onto the oldest rows, so the last `overwritten` slots are the ones that held rows.
                np.subtract.at(self.counts, (columns, self.window[slots[len(slots) - overwritten:]]), 1)
            self.window[slots] = binned
            np.add.at(self.counts, (columns, binned), 1)
            self.position = (self.position + len(binned)) % self.window_rows
            self.filled = min(self.window_rows, self.filled + len(binned))
            for value, count in zip(values.tolist(), value_counts.tolist()):
                self.predictions[str(value)] = self.predictions.get(str(value), 0) + count

    def scores(self) -> np.ndarray | None:
        """Each feature's PSI over the window, or None while the window holds fewer than MIN_ROWS rows."""
        with self.lock:
            if self.filled < min(MIN_ROWS, self.window_rows):
                return None
            live = np.maximum(self.counts / self.filled, FLOOR_SHARE)
        return ((live - self.reference) * np.log(live / self.reference)).sum(axis=1)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        window = GaugeMetricFamily("mlops_drift_window_rows", "Recent rows the drift scores cover")
        window.add_metric([], self.filled)
        yield window
        scores = self.scores()
        psi = GaugeMetricFamily("mlops_drift_psi", "Population stability index of each input feature over the "
                                                   "recent rows against the model's training data", labels=["feature"])
        for feature, score in enumerate(scores if scores is not None else []):
            psi.add_metric([str(feature)], float(score))
        yield psi
        predicted = CounterMetricFamily("mlops_predictions", "Predictions by predicted value", labels=["prediction"])
        with self.lock:
            for value, count in sorted(self.predictions.items()):
                predicted.add_metric([value], count)
        yield predicted
        reference = GaugeMetricFamily("mlops_reference_prediction_share", "Share of each class in the training "
                                                                          "labels", labels=["prediction"])
        for value, share in sorted(self.class_shares.items()):
            reference.add_metric([value], share)
        yield reference
