"""Input drift: how far the rows a replica predicted lately are from its model's training data.

The training run records a reference profile in the model's manifest (mlops_training/profile.py): per
feature, bin edges and the share of training rows in each bin; and a classifier's class balance, or for a
regressor fixed bins of its training targets (`target_bins`), in which its predictions are counted. The replica keeps
its last `window_rows` rows as the batches they came in, which costs a request an append, and bins them and
computes each feature's population stability index only when Prometheus scrapes:

    PSI = sum over bins (live share - reference share) * ln(live share / reference share)

0 means the same distribution; rules of thumb read 0.1 as a shift worth a look and 0.25 as a large one.
Rows drawn from the training distribution score about (bins - 1) / window_rows from sampling noise alone.
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Any, Iterator, Sequence

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
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
    `mlops_drift_psi{feature}` (named by `feature_names`, the schema's, else numbered), `mlops_drift_window_rows`,
    `mlops_predictions_total{prediction}` and `mlops_reference_prediction_share{prediction}`. A classifier's
    predictions are counted by class next to the training data's class balance; a regressor's (`task`
    regression) in the fixed bins of the profile's `target_bins`, so their series stay as many as the bins
    whatever values the traffic brings."""

    def __init__(self, profile: dict[str, Any], n_features: int, window_rows: int, *,
                 feature_names: Sequence[str] = (), task: str | None = None) -> None:
        try:
            features = profile["features"]
            self.edges = [np.asarray(feature["edges"], dtype=np.float64) for feature in features]
            proportions = [np.asarray(feature["proportions"], dtype=np.float64) for feature in features]
            self.reference_shares = {str(label): float(share) for label, share in profile.get("class_shares", {}).items()}
            target_bins = profile.get("target_bins")
            self.target_edges = None if target_bins is None else np.asarray(target_bins["edges"], dtype=np.float64)
            target_shares = None if target_bins is None else [float(share) for share in target_bins["proportions"]]
        except (KeyError, TypeError, ValueError) as error:
            raise ProfileError(f"the manifest's reference_profile is malformed: {error!r}") from None
        if len(features) != n_features:
            raise ProfileError(f"the reference profile describes {len(features)} features, the model takes {n_features}")
        if any(len(shares) != len(edges) + 1 for shares, edges in zip(proportions, self.edges)):
            raise ProfileError("each profiled feature needs one proportion more than it has bin edges")
        profiled_names = [feature.get("name") for feature in features]
        if feature_names and profiled_names != list(feature_names):
            raise ProfileError(f"the reference profile describes features {profiled_names}, the schema "
                               f"{list(feature_names)}")
        self.feature_labels = list(feature_names) or [str(feature) for feature in range(n_features)]
        if task == "regression":
            if self.target_edges is None or target_shares is None:
                raise ProfileError("a regressor's reference profile needs target_bins (its predictions are counted "
                                   "in those bins)")
            if len(target_shares) != len(self.target_edges) + 1:
                raise ProfileError("the profile's target_bins need one proportion more than they have edges")
            self.bin_labels: list[str] | None = bin_labels(self.target_edges)
            self.reference_shares = dict(zip(self.bin_labels, target_shares))
        else:
            self.bin_labels = None
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
        self.predictions: dict[str, int] = dict.fromkeys(self.bin_labels or (), 0)
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
        predicted = np.concatenate(self.uncounted)
        self.uncounted.clear()
        if self.bin_labels is not None and self.target_edges is not None:
            counts = np.bincount(np.searchsorted(self.target_edges, predicted.astype(np.float64), side="right"),
                                 minlength=len(self.bin_labels))
            labelled = zip(self.bin_labels, counts.tolist())
        else:
            values, counts = np.unique(predicted, return_counts=True)
            labelled = zip(map(str, values.tolist()), counts.tolist())
        for label, count in labelled:
            self.predictions[label] = self.predictions.get(label, 0) + count

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

    def collect(self) -> Iterator[Metric]:
        recent = self.window()
        window = GaugeMetricFamily("mlops_drift_window_rows", "Recent rows the drift scores cover")
        window.add_metric([], len(recent))
        yield window
        scores = self.scores(recent)
        psi = GaugeMetricFamily("mlops_drift_psi", "Population stability index of each input feature over the "
                                                   "recent rows against the model's training data", labels=["feature"])
        for feature, score in zip(self.feature_labels, scores if scores is not None else []):
            psi.add_metric([feature], float(score))
        yield psi
        predicted = CounterMetricFamily("mlops_predictions", "Predictions by predicted class, or a regressor's by "
                                                             "bin of predicted values", labels=["prediction"])
        with self.lock:
            if self.uncounted:
                self._count_predictions()
            for value, count in sorted(self.predictions.items()):
                predicted.add_metric([value], count)
        yield predicted
        reference = GaugeMetricFamily("mlops_reference_prediction_share", "Share of each class (or bin) in the "
                                                                          "training labels", labels=["prediction"])
        for value, share in sorted(self.reference_shares.items()):
            reference.add_metric([value], share)
        yield reference


def bin_labels(edges: np.ndarray) -> list[str]:
    """Each bin's range as a label, `[-inf,87.0)` to `[310.5,+inf)`: bin i holds edges[i-1] <= v < edges[i]."""
    bounds = ["-inf", *(repr(float(edge)) for edge in edges), "+inf"]
    return [f"[{low},{high})" for low, high in zip(bounds, bounds[1:])]
