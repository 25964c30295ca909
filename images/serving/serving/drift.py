"""Input drift: how far the rows a replica predicted lately are from its model's training data.

The training run records a reference profile in the model's manifest (mlops_training/profile.py): per
feature, bin edges and the share of training rows in each bin, and the class balance. The replica keeps
its last `window_rows` rows as the batches they came in, which costs a request an append, and bins them and
computes each feature's population stability index only when Prometheus scrapes:

    PSI = sum over bins (live share - reference share) * ln(live share / reference share)

0 means the same distribution; rules of thumb read 0.1 as a shift worth a look and 0.25 as a large one.
Rows drawn from the training distribution score about (bins - 1) / window_rows from sampling noise alone.
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Any, Iterator

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# Shares below this count as this much, so an empty bin on either side weighs heavily but stays finite.
FLOOR_SHARE = 1e-4
# Below this many rows a PSI is mostly noise: none is exported yet.
MIN_ROWS = 100
# Predictions are counted in bulk, at a scrape or after this many batches, whichever comes first.
COUNT_EVERY_BATCHES = 1024


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
        # The last batches, holding at least the last `window_rows` rows; binned only when scraped, so a
        # request pays for an append, and rows that leave the window before a scrape are never binned.
        self.recent: deque[np.ndarray] = deque()
        self.recent_rows = 0
        self.uncounted: list[np.ndarray] = []
        self.predictions: dict[str, int] = {}
        self.lock = threading.Lock()

    def observe(self, rows: np.ndarray, predictions: np.ndarray) -> None:
        """Add a batch of rows (2-D, one column per feature) and its predictions; rows the window no longer
        needs are dropped."""
        with self.lock:
            self.recent.append(rows)
            self.recent_rows += len(rows)
            while self.recent_rows - len(self.recent[0]) >= self.window_rows:
                self.recent_rows -= len(self.recent.popleft())
            self.uncounted.append(predictions)
            if len(self.uncounted) >= COUNT_EVERY_BATCHES:
                self._count_predictions()

    def _count_predictions(self) -> None:
        values, counts = np.unique(np.concatenate(self.uncounted), return_counts=True)
        self.uncounted.clear()
        for value, count in zip(values.tolist(), counts.tolist()):
            self.predictions[str(value)] = self.predictions.get(str(value), 0) + count

    def window(self) -> np.ndarray:
        """The last `window_rows` rows (fewer until that many arrived)."""
        with self.lock:
            batches = list(self.recent)
        return np.concatenate(batches)[-self.window_rows:] if batches else np.empty((0, len(self.edges)))

    def scores(self, window: np.ndarray) -> np.ndarray | None:
        """Each feature's PSI over `window`, or None while it holds fewer than MIN_ROWS rows."""
        if len(window) < min(MIN_ROWS, self.window_rows):
            return None
        live = np.stack([np.bincount(np.searchsorted(edges, window[:, feature], side="right"), minlength=self.bins)
                         for feature, edges in enumerate(self.edges)]) / len(window)
        live = np.maximum(live, FLOOR_SHARE)
        return ((live - self.reference) * np.log(live / self.reference)).sum(axis=1)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        recent = self.window()
        window = GaugeMetricFamily("mlops_drift_window_rows", "Recent rows the drift scores cover")
        window.add_metric([], len(recent))
        yield window
        scores = self.scores(recent)
        psi = GaugeMetricFamily("mlops_drift_psi", "Population stability index of each input feature over the "
                                                   "recent rows against the model's training data", labels=["feature"])
        for feature, score in enumerate(scores if scores is not None else []):
            psi.add_metric([str(feature)], float(score))
        yield psi
        predicted = CounterMetricFamily("mlops_predictions", "Predictions by predicted value", labels=["prediction"])
        with self.lock:
            if self.uncounted:
                self._count_predictions()
            for value, count in sorted(self.predictions.items()):
                predicted.add_metric([value], count)
        yield predicted
        reference = GaugeMetricFamily("mlops_reference_prediction_share", "Share of each class in the training "
                                                                          "labels", labels=["prediction"])
        for value, share in sorted(self.class_shares.items()):
            reference.add_metric([value], share)
        yield reference
