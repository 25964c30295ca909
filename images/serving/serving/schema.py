"""What a model takes and does, as its manifest says (the `schema` and `task` the training run recorded).

A manifest without a schema (a model registered before schemas) still gets one: its input width, from the
model, with no feature names; requests then take only the one [N, features] tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

FEATURE_TYPES = ("float", "int")
TASKS = ("classification", "regression")


class SchemaError(ValueError):
    """The manifest's schema is malformed or does not fit the model."""


@dataclass(frozen=True)
class Feature:
    name: str
    type: str
    """`float` or `int`."""


@dataclass(frozen=True)
class ModelSchema:
    n_features: int
    features: tuple[Feature, ...] = ()
    """In the model's input order; empty when the manifest has no schema."""
    task: str | None = None

    @classmethod
    def of(cls, manifest: dict[str, Any] | None, n_features: int) -> ModelSchema:
        """The schema `manifest` records for a model taking `n_features` inputs, or SchemaError saying why not."""
        described = (manifest or {}).get("schema")
        if described is None:
            return cls(n_features)
        try:
            features = tuple(Feature(str(feature["name"]), str(feature["type"])) for feature in described["features"])
        except (KeyError, TypeError) as error:
            raise SchemaError(f"the manifest's schema is malformed: {error!r}") from None
        task = (manifest or {}).get("task")
        if task not in TASKS:
            raise SchemaError(f"the manifest's task is {task!r}; expected one of {', '.join(TASKS)}")
        wrong_types = sorted({feature.type for feature in features} - set(FEATURE_TYPES))
        if wrong_types:
            raise SchemaError(f"the manifest's schema has feature types {', '.join(wrong_types)}; "
                              f"expected {' or '.join(FEATURE_TYPES)}")
        names = [feature.name for feature in features]
        if len(set(names)) != len(names):
            raise SchemaError("the manifest's schema names a feature twice")
        if len(features) != n_features:
            raise SchemaError(f"the manifest's schema lists {len(features)} features, the model takes {n_features}")
        return cls(n_features, features, task)

    @cached_property  # read by every request; frozen dataclasses take it (it writes the instance's __dict__)
    def names(self) -> list[str]:
        return [feature.name for feature in self.features]

    def expected_inputs(self) -> str:
        """The request forms this model takes, for the errors that refuse another."""
        tensor = f"one FP32 or FP64 tensor [N, {self.n_features}]"
        if not self.features:
            return f"expected {tensor}"
        return f"expected one input per feature: {', '.join(self.names)} (or {tensor})"
