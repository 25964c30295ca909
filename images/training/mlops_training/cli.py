"""Command line of the training image. Progress goes to stdout line by line; the last line is machine-readable:
`REGISTERED name=<name> version=<version> sha256=<sha256>` (or `TRAINED sha256=<sha256> output_dir=<dir>`
without a tracking URI). Bad inputs print one `error:` line on stderr and exit 2."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from mlops_training.datasets import DATASETS_DIR
from mlops_training.train import DEFAULT_MODEL_NAME, TrainingError, TrainingRequest, parse_param, train

BAD_INPUT_EXIT = 2
REGISTRY_FAILURE_EXIT = 1


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mlops_training",
        description="Train the iris classifier deterministically and register it in MLflow.")
    parser.add_argument("--subset", type=float, default=1.0, help="fraction (0, 1] of the data, stratified and seeded")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="estimator parameter, repeatable (e.g. n_estimators=50)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the subset, the held-out split and the estimator")
    parser.add_argument("--data", metavar="NAME", help="train on this dataset of the datasets volume ('latest' or its "
                                                        "sha256) instead of the built-in iris data")
    parser.add_argument("--datasets-dir", type=Path, default=DATASETS_DIR, help="where the datasets volume is mounted")
    parser.add_argument("--model-name", default=DEFAULT_MODEL_NAME, help="registered model name")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="MLflow server to log and register in (default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--output-dir", type=Path, help="keep model.pkl and manifest.json here")
    return parser


def progress(message: str) -> None:
    print(f"[training] {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.output_dir is None and not args.tracking_uri:
        print("error: give --tracking-uri (or MLFLOW_TRACKING_URI) to register the model, or --output-dir to keep it",
              file=sys.stderr)
        return BAD_INPUT_EXIT
    try:
        request = TrainingRequest(seed=args.seed, subset=args.subset, model_name=args.model_name,
                                  params=dict(parse_param(assignment) for assignment in args.param), dataset=args.data)
        progress(f"training {request.model_name}: subset={request.subset} seed={request.seed} params={request.params}"
                 f" data={request.dataset or 'built-in iris'}")
        result = train(request, args.output_dir or Path(tempfile.mkdtemp(prefix="training-")), args.datasets_dir)
    except TrainingError as err:
        print(f"error: {err}", file=sys.stderr)
        return BAD_INPUT_EXIT
    metrics = " ".join(f"{key}={value}" for key, value in result.metrics.items())
    progress(f"trained: {metrics} sha256={result.model_sha256}")
    progress(f"dataset: {result.manifest['inputs']['dataset']}")
    if not args.tracking_uri:
        print(f"TRAINED sha256={result.model_sha256} output_dir={result.model_path.parent}", flush=True)
        return 0

    # Imported only here: the MLflow client takes seconds to import and in-process runs never need it.
    from mlflow.exceptions import MlflowException

    from mlops_training.registry import register

    progress(f"logging the run and registering {request.model_name} at {args.tracking_uri}")
    try:
        version = register(result, args.tracking_uri)
    except MlflowException as err:
        print(f"error: registering at {args.tracking_uri} failed: {err.message.splitlines()[0]}", file=sys.stderr)
        return REGISTRY_FAILURE_EXIT
    # One write with its newline: print() writes the text and the newline separately when unbuffered, and
    # Docker may deliver a stderr line (MLflow's client logs) between the two, which breaks the line.
    sys.stdout.write(f"REGISTERED name={request.model_name} version={version} sha256={result.model_sha256}\n")
    sys.stdout.flush()
    return 0
