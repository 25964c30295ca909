"""The transformer the diabetes pipeline holds: it is pickled with the model, so the serving image imports this
module to unpickle it (the project's code is on PYTHONPATH in both images)."""
from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin


class QuantileClipper(TransformerMixin, BaseEstimator):
    """Clips every feature to the [lower, upper] quantiles of the training data, so a few extreme inputs move a
    linear model's predictions no further than the training data's own range did."""

    def __init__(self, lower: float = 0.01, upper: float = 0.99) -> None:
        self.lower = lower
        self.upper = upper

    def fit(self, features: np.ndarray, labels: object = None) -> "QuantileClipper":
        features = np.asarray(features, dtype=np.float64)
        self.low_ = np.quantile(features, self.lower, axis=0)
        self.high_ = np.quantile(features, self.upper, axis=0)
        self.n_features_in_ = features.shape[1]
        return self

    def transform(self, features: np.ndarray) -> np.ndarray:
        return np.clip(np.asarray(features, dtype=np.float64), self.low_, self.high_)
