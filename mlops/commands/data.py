"""`mlops data`: each model's labelled training data on a stage's artifact store, and the serving samples to label
next.

Datasets are kept per model, in `datasets_folder(model)` of the datasets volume. Every command works on one model
(`--model`) and runs one short-lived container of that model's training image on the stage's Docker host (the
image's `mlops_training.datasets`, which holds the dataset format: the model's feature names, its classes and
the size bound, and keeps to the model's own folder), hardened like every run of the CLI's own, without a
network, with only the one volume it needs mounted: `add` the datasets volume read-write, `list` it read-only,
`samples` the samples volume read-only, exporting the files of the model's replicas only. `add` checks the
file's header against the model's schema here, then the file whole in that container before writing anything,
then writes it under a temporary name and renames it to `<sha256>.csv`. On a swarm the volumes would be local to
whichever node ran the container, so these commands, like `mlops train --data`, work on single-host stages only.
"""
from __future__ import annotations

import csv
import io
import json
import subprocess
from pathlib import Path
from typing import IO, Optional

import typer
from rich.console import Console
from rich.table import Table

from components.runtimes import docker_run_arguments
from components.stack import stage_labels
from components.workload import Run, VolumeMount
from mlops import credentials
from mlops.commands.specs import ENVIRONMENTS_OPTION, reads_specs
from mlops.commands.train import (
    BAD_INPUT_EXIT,
    check_engine,
    check_volume,
    fail,
    image_digest,
    stage_model,
    stage_spec,
    training_image,
)
from mlops.modelstore import StoreError
from mlops.reach import StageReach, Unreachable
from mlops_spec.contract import (
    DATASETS_DIR,
    DATASETS_VOLUME,
    READER,
    SAMPLES_DIR,
    SAMPLES_VOLUME,
    datasets_folder,
    serving_name,
    volume_name,
)
from mlops_spec.errors import excerpt, one_line
from mlops_spec.loading import load_stages
from mlops_spec.model_project import load_model_project
from mlops_spec.models import Limits, StageSpec

app = typer.Typer(no_args_is_help=True, help="Training data on a stage's artifact store: add, list, export samples, "
                                             "and whether the newest is fresh.")
console = Console(highlight=False, soft_wrap=True)
DATA_RUN_LIMITS = Limits(cpus=1.0, memory_mb=256)
DATASETS_MODULE = ("python3", "-m", "mlops_training.datasets")
NOT_FRESH_EXIT = 1
PREDICTION = "prediction"
"""The column `samples` exports beside the features, which `add` drops (mlops_training.datasets)."""
MAX_HEADER_BYTES = 64 * 1024
"""More than any schema's header: a file without line breaks is not read whole here to find its first line."""
SLOTS = ("blue", "green")
MODEL_OPTION = typer.Option(None, "--model", help="whose data: a model the stage declares; may be left out when "
                                                  "it declares one")


def single_host_spec(stage: str, environments: Path) -> StageSpec:
    spec = stage_spec(stage, environments)
    if spec.swarm is not None:
        raise fail(f"{stage} is a swarm stage: its datasets and samples volumes would be local to one node, so "
                   "`mlops data` and `mlops train --data` work on single-host stages only", BAD_INPUT_EXIT)
    return spec


def stored_datasets(spec: StageSpec, model: str, environments: Path) -> list[dict]:
    """The model's datasets on the stage's volume, oldest first: name, sha256, rows, added."""
    ran = run_in_stage(spec, model, environments, DATASETS_VOLUME, DATASETS_DIR, True, ["list"])
    return [json.loads(line) for line in ran.stdout.decode().splitlines()]


def trained_on(spec: StageSpec, served: StageSpec, model: str) -> Optional[str]:
    """The sha256 of the dataset the version of `model` that `served` serves was trained on, as its manifest in
    `spec`'s MLflow records it (every model is trained, so registered, there first); None for a version trained
    on the built-in data, or a model `served` does not serve."""
    release = served.models[model].release
    if release is None:
        return None
    pin = release.of(model)
    try:
        with StageReach(spec) as reach:
            store = reach.model_store(READER)
            if pin.version == "latest":
                version: Optional[int] = store.latest_version(pin.name)
            elif pin.sha256 is None:  # only dev pins a bare version, of a model it trained into its own MLflow
                version = pin.version
            else:
                version = store.find_version(pin.name, pin.sha256)
            if version is None:
                raise fail(f"{served.stage}'s version of {pin.name} (sha256 {pin.sha256}) is not in {spec.stage}'s MLflow, "
                           "where it was trained: cannot tell which data it was trained on", BAD_INPUT_EXIT)
            manifest = json.loads(store.fetch(pin.name, version).files["manifest.json"])
    except (credentials.MissingSecret, Unreachable, StoreError) as err:
        raise fail(str(err), BAD_INPUT_EXIT) from None
    return manifest["inputs"].get("dataset_sha256")


def data_run_arguments(spec: StageSpec, image: str, volume: str, mount: str, read_only: bool,
                       command: list[str]) -> list[str]:
    """A throw-away, networkless, hardened run of the training image's datasets module with `volume` mounted."""
    return docker_run_arguments(Run(
        component="data-run", image=image, entrypoint=DATASETS_MODULE, args=command, limits=DATA_RUN_LIMITS,
        labels=stage_labels(spec, spec.stage), network="none", interactive=True,
        volumes=[VolumeMount(volume_name(spec.stage, volume), mount, read_only=read_only)]))


def run_in_stage(spec: StageSpec, model: str, environments: Path, volume: str, mount: str, read_only: bool,
                 command: list[str], stdin: Optional[IO[bytes]] = None,
                 refused: str = "") -> subprocess.CompletedProcess[bytes]:
    """Run `command` of the datasets module in the model's training image on the stage's host; on bad input exit 2
    with the image's error line after `refused` (what was refused), on anything else fail naming the stage."""
    check_engine(spec)
    check_volume(spec, volume)
    image = training_image(spec, model, environments)
    image_digest(spec, image)  # says how to get the image when it is not on the host
    ran = subprocess.run(["docker", *data_run_arguments(spec, image, volume, mount, read_only, command)],
                         stdin=stdin if stdin is not None else subprocess.DEVNULL, capture_output=True,
                         env=spec.docker.cli_environment())
    if ran.returncode != 0:
        problem = (ran.stderr.decode(errors="replace").strip().splitlines() or [f"exit code {ran.returncode}"])[-1]
        if ran.returncode == BAD_INPUT_EXIT and problem.startswith("error: "):
            raise fail(refused + problem.removeprefix("error: "), BAD_INPUT_EXIT)
        raise fail(f"the data run on {spec.stage}'s host ({spec.docker.url}) failed: {problem}")
    return ran


def check_header(file: Path, handle: IO[bytes], model: str) -> None:
    """The file's first line must be the model's schema, its features then its label (models/<model>/
    mlops-model.yaml), a `prediction` column aside: data of another model is refused before the engine is asked."""
    expected = load_model_project(model).input_schema.header
    first = handle.readline(MAX_HEADER_BYTES).decode("utf-8-sig", errors="replace")
    handle.seek(0)
    header = [column.strip() for column in next(csv.reader(io.StringIO(first)), [])]
    if [column for column in header if column != PREDICTION] != expected:
        raise fail(f"{file}: the header must be {model}'s features then its label, {','.join(expected)} (a "
                   f"'{PREDICTION}' column is allowed and dropped); got {excerpt(','.join(header)) or 'nothing'}",
                   BAD_INPUT_EXIT)


@app.command("add")
@reads_specs
def add(file: Path = typer.Argument(..., help="a CSV file: the model's feature names and its label as header"),
        stage: str = typer.Option(..., "--stage", help="whose datasets volume"),
        model: Optional[str] = MODEL_OPTION,
        environments: Path = ENVIRONMENTS_OPTION) -> None:
    """Check a labelled CSV file against the model's schema and add it to the model's datasets on the stage's
    datasets volume as <sha256>.csv.

    Bad input (header, a value that is not a finite number, a missing or unknown label, too large): one line
    naming the file and the row, exit 2, nothing written."""
    spec = single_host_spec(stage, environments)
    model = stage_model(spec, model, environments)
    try:
        # Unbuffered: the container reads the file from its descriptor, which is where this process's reads left
        # it only without a buffer in between.
        handle = open(file, "rb", buffering=0)
    except OSError as err:
        raise fail(f"{file}: {err.strerror}", BAD_INPUT_EXIT) from None
    with handle:
        check_header(file, handle, model)
        ran = run_in_stage(spec, model, environments, DATASETS_VOLUME, DATASETS_DIR, False, ["add"], stdin=handle,
                           refused=f"{file}: ")
    console.print(f"{file}: {ran.stdout.decode().strip()} in {datasets_folder(model)} on "
                  f"{volume_name(spec.stage, DATASETS_VOLUME)}", markup=False)


@app.command("list")
@reads_specs
def list_datasets(stage: str = typer.Option(..., "--stage", help="whose datasets volume"),
                  model: Optional[str] = MODEL_OPTION,
                  as_json: bool = typer.Option(False, "--json", help="one JSON object per dataset, oldest first"),
                  environments: Path = ENVIRONMENTS_OPTION) -> None:
    """The model's datasets on the stage's datasets volume, oldest first: name (sha256), rows, when added."""
    spec = single_host_spec(stage, environments)
    model = stage_model(spec, model, environments)
    datasets = stored_datasets(spec, model, environments)
    if as_json:
        typer.echo(json.dumps(datasets))
        return
    if not datasets:
        console.print(f"{stage}: no datasets of {model} yet; add one with `mlops data add --stage {stage} --model "
                      f"{model} FILE.csv`", markup=False)
        return
    table = Table("sha256", "rows", "added (UTC)", title=f"{stage}: datasets of {model} ({datasets_folder(model)} on "
                                                         f"{volume_name(stage, DATASETS_VOLUME)})")
    for dataset in datasets:
        table.add_row(dataset["sha256"], str(dataset["rows"]), dataset["added"])
    console.print(table)


@app.command("samples")
@reads_specs
def samples(stage: str = typer.Option(..., "--stage", help="whose serving samples"),
            model: Optional[str] = MODEL_OPTION,
            out: Path = typer.Option(..., "--out", help="the CSV file to write: feature columns, `prediction`, "
                                                        "an empty label column to fill in"),
            environments: Path = ENVIRONMENTS_OPTION) -> None:
    """Export every row the model's replicas (blue and green) sampled, with its prediction, as a CSV ready for
    labelling."""
    spec = single_host_spec(stage, environments)
    model = stage_model(spec, model, environments)
    if spec.models[model].sampling is None:
        raise fail(f"{stage} does not sample {model}'s requests: declare models.{model}.sampling (docs/contracts.md "
                   "says what it keeps)", BAD_INPUT_EXIT)
    pools = [serving_name(spec.stage, model, slot) for slot in SLOTS]
    ran = run_in_stage(spec, model, environments, SAMPLES_VOLUME, SAMPLES_DIR, True, ["samples", *pools])
    temporary = out.with_name(f".{out.name}.tmp")
    try:
        temporary.write_bytes(ran.stdout)
        temporary.replace(out)
    except OSError as err:
        temporary.unlink(missing_ok=True)
        raise fail(f"{out}: {err.strerror}", BAD_INPUT_EXIT) from None
    rows = ran.stdout.count(b"\n") - 1
    skipped = [line for line in ran.stderr.decode(errors="replace").splitlines() if line.startswith("skipped ")]
    console.print(one_line(f"{out}: {rows} sampled rows of {model}{'; ' + skipped[0] if skipped else ''}; fill in the "
                           f"label, then `mlops data add --stage {stage} --model {model} {out}`"), markup=False)


@app.command("fresh")
@reads_specs
def fresh(stage: str = typer.Option(..., "--stage", help="where training runs: whose datasets and MLflow"),
          serving: str = typer.Option(..., "--serving", help="the stage whose served version of the model is compared"),
          model: Optional[str] = MODEL_OPTION,
          environments: Path = ENVIRONMENTS_OPTION) -> None:
    """Whether the model's newest dataset on the stage is newer than the one SERVING's version of it was trained on.

    Exit 0 printing `FRESH name=... rows=... added=...`; 1 when there is no dataset, or the newest is the one the
    served version was trained on (retraining would learn nothing new); 2 bad input or MLflow not answering."""
    spec = single_host_spec(stage, environments)
    served = load_stages([serving], environments)[0]
    model = stage_model(spec, model, environments)
    stage_model(served, model, environments)
    datasets = stored_datasets(spec, model, environments)
    if not datasets:
        console.print(f"no dataset of {model} on {volume_name(stage, DATASETS_VOLUME)}: nothing fresh to train on; add "
                      f"one with `mlops data add --stage {stage} --model {model} FILE.csv`", markup=False)
        raise typer.Exit(NOT_FRESH_EXIT)
    newest = datasets[-1]
    if trained_on(spec, served, model) == newest["sha256"]:
        console.print(f"no dataset of {model} newer than {newest['name']} (added {newest['added']}), which {serving}'s "
                      "version was trained on: retraining would learn nothing new", markup=False)
        raise typer.Exit(NOT_FRESH_EXIT)
    console.print(f"FRESH name={newest['name']} rows={newest['rows']} added={newest['added']}", markup=False)
