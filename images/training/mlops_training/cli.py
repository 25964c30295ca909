"""Command line of a model's training image: the platform's runner (mlops_training/runner.py) around the project
baked into the image (MODEL_PROJECT_DIR). Progress goes to stdout line by line; the last line is machine-readable:
`REGISTERED name=<name> version=<version> sha256=<sha256>` (or `TRAINED sha256=<sha256> output_dir=<dir>`
without a tracking URI). Bad inputs print one `error:` line on stderr and exit 2."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from mlops_training.datasets import DATASETS_DIR
from mlops_training.project import ProjectError, load_project
from mlops_training.runner import TrainingError, TrainingRequest, parse_param, train

BAD_INPUT_EXIT = 2
REGISTRY_FAILURE_EXIT = 1


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mlops_training",
        description="Train the image's model project with its entrypoint, check and register the model in MLflow.")
    parser.add_argument("--subset", type=float, default=1.0, help="fraction (0, 1] of the data, passed to the "
                                                                   "entrypoint")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="overrides a default parameter of the project, repeatable (e.g. n_estimators=50)")
    parser.add_argument("--seed", type=int, default=0, help="passed to the entrypoint, which seeds all it draws by it")
    parser.add_argument("--data", metavar="NAME", help="train on this dataset of the datasets volume ('latest' or its "
                                                        "sha256) instead of the project's default data")
    parser.add_argument("--datasets-dir", type=Path, default=DATASETS_DIR, help="where the datasets volume is mounted")
    parser.add_argument("--project", type=Path, help="the model project (default: $MODEL_PROJECT_DIR)")
    parser.add_argument("--model-name", help="registered model name (default: the project's, $MODEL_NAME)")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="MLflow server to log and register in (default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--output-dir", type=Path, help="keep model.pkl, manifest.json (and model.skops) here")
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
        project = load_project(args.project, args.model_name)
        request = TrainingRequest(seed=args.seed, subset=args.subset,
                                  params=dict(parse_param(assignment) for assignment in args.param), dataset=args.data)
        progress(f"training {project.name} with {project.entrypoint}: subset={request.subset} seed={request.seed} "
                 f"params={ {**project.params, **request.params} } data={request.dataset or project.default_data.name}")
        result = train(project, request, args.output_dir or Path(tempfile.mkdtemp(prefix="training-")),
                       args.datasets_dir)
    except (TrainingError, ProjectError) as err:
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

    progress(f"logging the run and registering {project.name} at {args.tracking_uri}")
    try:
        version = register(result, args.tracking_uri)
    except MlflowException as err:
        print(f"error: registering at {args.tracking_uri} failed: {err.message.splitlines()[0]}", file=sys.stderr)
        return REGISTRY_FAILURE_EXIT
    # One write with its newline: print() writes the text and the newline separately when unbuffered, and
    # Docker may deliver a stderr line (MLflow's client logs) between the two, which breaks the line.
    sys.stdout.write(f"REGISTERED name={project.name} version={version} sha256={result.model_sha256}\n")
    sys.stdout.flush()
    return 0
