"""A team's own transformer, as a model project's module holds one: a pipeline pickled with it unpickles only
where this module is importable, as in a model's serving image."""
from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin


class BmiTimesPressure(BaseEstimator, TransformerMixin):
    """Appends the product of two columns (body mass index and blood pressure in the diabetes data)."""

    def __init__(self, bmi: int = 2, pressure: int = 3) -> None:
        self.bmi = bmi
        self.pressure = pressure

    def fit(self, features: np.ndarray, target: np.ndarray | None = None) -> BmiTimesPressure:
        self.n_features_in_ = np.asarray(features).shape[1]
        return self

    def transform(self, features: np.ndarray) -> np.ndarray:
        features = np.asarray(features, dtype=np.float64)
        return np.column_stack([features, features[:, self.bmi] * features[:, self.pressure]])
