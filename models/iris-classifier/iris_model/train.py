"""Train the iris classifier: `python -m iris_model.train --data CSV --output-dir DIR --seed N --subset F --params JSON`
(the platform's interface, docs/models.md). Writes DIR/model.pkl and DIR/metrics.json; nothing else.

Deterministic: randomness comes only from --seed (subset, held-out split, forest), the forest runs on one
thread and the pipeline is pickled with a fixed protocol, so the same inputs give a byte-identical model.pkl.
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

import numpy as np
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

HELD_OUT_FRACTION = 0.25
PICKLE_PROTOCOL = 5
# n_jobs is pickled with the model: fixed, the model's bytes do not depend on how many cores a run used.
FIXED_PARAMS = {"n_jobs": 1}


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m iris_model.train")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--subset", type=float, required=True)
    parser.add_argument("--params", type=json.loads, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    table = np.loadtxt(args.data, delimiter=",", skiprows=1, ndmin=2)
    features, labels = table[:, :-1], table[:, -1].astype(np.int64)
    forest = RandomForestClassifier(random_state=args.seed, **FIXED_PARAMS)
    unknown = sorted(set(args.params) - set(forest.get_params()) | set(args.params) & {"random_state", *FIXED_PARAMS})
    if unknown:
        print(f"error: unknown parameter(s) {', '.join(unknown)} for RandomForestClassifier (the seed is --seed)",
              file=sys.stderr)
        return 2
    forest.set_params(**args.params)
    if args.subset < 1:
        features, _, labels, _ = train_test_split(features, labels, train_size=args.subset, stratify=labels,
                                                  random_state=args.seed)
    train_x, test_x, train_y, test_y = train_test_split(features, labels, test_size=HELD_OUT_FRACTION,
                                                        stratify=labels, random_state=args.seed)
    pipeline = Pipeline([("scale", StandardScaler()), ("classify", forest)]).fit(train_x, train_y)
    predictions = pipeline.predict(test_x)
    metrics = {"accuracy": round(float(accuracy_score(test_y, predictions)), 6),
               "f1_macro": round(float(f1_score(test_y, predictions, average="macro")), 6)}
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "model.pkl").write_bytes(pickle.dumps(pipeline, protocol=PICKLE_PROTOCOL))
    (args.output_dir / "metrics.json").write_text(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
