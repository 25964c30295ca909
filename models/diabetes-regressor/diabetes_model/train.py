"""Train the diabetes regressor: `python -m diabetes_model.train --data CSV --output-dir DIR --seed N --subset F
--params JSON` (the platform's interface, docs/models.md). Writes DIR/model.pkl and DIR/metrics.json.

Deterministic: the subset and the held-out split are drawn from --seed, Ridge has no randomness of its own,
and the pipeline is pickled with a fixed protocol.
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

import numpy as np
from sklearn.linear_model import Ridge
from sklearn.metrics import mean_squared_error, r2_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline

from diabetes_model.transformers import QuantileClipper

HELD_OUT_FRACTION = 0.25
PICKLE_PROTOCOL = 5


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m diabetes_model.train")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--subset", type=float, required=True)
    parser.add_argument("--params", type=json.loads, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    table = np.loadtxt(args.data, delimiter=",", skiprows=1, ndmin=2)
    features, targets = table[:, :-1], table[:, -1]
    ridge = Ridge()
    unknown = sorted(set(args.params) - set(ridge.get_params()))
    if unknown:
        print(f"error: unknown parameter(s) {', '.join(unknown)} for Ridge; allowed: "
              f"{', '.join(sorted(ridge.get_params()))}", file=sys.stderr)
        return 2
    ridge.set_params(**args.params)
    if args.subset < 1:
        features, _, targets, _ = train_test_split(features, targets, train_size=args.subset, random_state=args.seed)
    train_x, test_x, train_y, test_y = train_test_split(features, targets, test_size=HELD_OUT_FRACTION,
                                                        random_state=args.seed)
    pipeline = Pipeline([("clip", QuantileClipper()), ("regress", ridge)]).fit(train_x, train_y)
    predictions = pipeline.predict(test_x)
    metrics = {"r2": round(float(r2_score(test_y, predictions)), 6),
               "rmse": round(float(np.sqrt(mean_squared_error(test_y, predictions))), 6)}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "model.pkl").write_bytes(pickle.dumps(pipeline, protocol=PICKLE_PROTOCOL))
    (args.output_dir / "metrics.json").write_text(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
