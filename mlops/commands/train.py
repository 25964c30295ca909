"""`mlops train`: one run of a model's training image on the stage's network, registered in the stage's MLflow.

The run is components/training_environment.py's `training_run`, rendered like every workload of the stack
(components/workload.py, components/runtimes.py): the same hardening, the stage's training limits, and with
`--data` the stage's datasets volume, read-only, of which the image reads its model's folder only (one host
only: see mlops/commands/data.py); it is removed when it ends, whatever the outcome. It logs in to MLflow as
`trainer`, whose password the run reads from a file that `docker cp` wrote from its standard input: it is in no
command line, no environment and not in the run's configuration. On a swarm stage the run is a one-shot Swarm
job instead (mlops/commands/swarm_training.py).
"""
from __future__ import annotations

import json
import re
import subprocess
import uuid
from pathlib import Path
from typing import Iterable, Optional

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from rich.markup import escape

from components.images import BuildSettings, model_image_name
from components.runtimes import docker_create_arguments, secret_files_archive
from components.stack import stage_labels
from components.training_environment import training_run
from components.workload import SECRETS_DIR, Run
from mlops import credentials
from mlops.commands import swarm_training
from mlops.commands.specs import ENVIRONMENTS_OPTION, reads_specs
from mlops.experiments import EXPERIMENT_PREFIX, experiment_spec_from_stack_file
from mlops.modelstore import BasicAuth, MlflowStore, StoreError
from mlops.reach import StageReach, Unreachable
from mlops.signing import SigningError, private_key, sign_version
from mlops_spec.contract import (
    DATASETS_VOLUME,
    IMAGE_REGISTRY_PORT,
    MLFLOW_PORT,
    MODEL_SIGNING_KEY,
    TRAINER,
    image_registry_name,
    model_registry_name,
    network_name,
    volume_name,
)
from mlops_spec.errors import SpecError, excerpt, one_line
from mlops_spec.loading import load_stages, stage_file
from mlops_spec.models import StageSpec
from mlops_spec.project import project_root

console = Console()
errors = Console(stderr=True)

# The training image's contract: exit 2 after one `error:` line on bad inputs, last line on success
# `REGISTERED name=<name> version=<version> sha256=<sha256>`.
BAD_INPUT_EXIT = 2
REGISTERED = re.compile(r"^REGISTERED name=(?P<name>\S+) version=(?P<version>\d+) sha256=(?P<sha256>[0-9a-f]{64})$")
PARAM_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Each --param becomes one `docker run` argument, which Linux caps at 128 KiB; no estimator parameter needs 1 KiB.
MAX_PARAM_VALUE = 1024
# What mlops_training.datasets resolves: `latest`, or a dataset's sha256 (or its first characters), `.csv` or not.
DATASET_NAME = re.compile(r"latest|[0-9a-f]{8,64}(\.csv)?")


def fail(message: str, code: int = 1) -> typer.Exit:
    errors.print(f"[red]error:[/red] {escape(one_line(message))}", highlight=False, soft_wrap=True, emoji=False)
    return typer.Exit(code)


def stage_spec(stage: str, environments: Path) -> StageSpec:
    """A stage's spec, an experiment's from the settings `mlops exp up` left in its stack file."""
    if stage.startswith(EXPERIMENT_PREFIX):
        return experiment_spec_from_stack_file(stage, environments=environments)
    return load_stages([stage], environments)[0]


def check_params(assignments: list[str]) -> None:
    """`--param key=value`: a parameter name, then a value of printable characters; each name once."""
    seen: set[str] = set()
    for assignment in assignments:
        key, equals, value = assignment.partition("=")
        if not equals or not PARAM_KEY.fullmatch(key):
            raise fail(f"--param '{excerpt(assignment)}' is not key=value", BAD_INPUT_EXIT)
        if len(value) > MAX_PARAM_VALUE or not value.isprintable():
            raise fail(f"--param {key}: the value must be at most {MAX_PARAM_VALUE} printable characters",
                       BAD_INPUT_EXIT)
        if key in seen:
            raise fail(f"--param {key} is given twice", BAD_INPUT_EXIT)
        seen.add(key)


def docker(spec: StageSpec, *args: str, stdin: Optional[str] = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], input=stdin, capture_output=True, text=True, env=spec.docker.cli_environment())


def image_registry_server(spec: StageSpec) -> Optional[str]:
    """Where the stack pushed its images: the engine reaches the registry over loopback on its host port (on
    a swarm, at the address every node pulls from)."""
    if not spec.image_registry.enabled:
        return None
    if spec.image_registry_server is not None:
        return spec.image_registry_server
    # Docker chose the port (experiments): ask it.
    return f"localhost:{published_port(spec, image_registry_name(spec.stage), IMAGE_REGISTRY_PORT)}"


def published_port(spec: StageSpec, container: str, port: int) -> int:
    """The host port Docker chose for `container`'s `port`."""
    published = docker(spec, "port", container, str(port))
    if published.returncode != 0 or not published.stdout.strip():
        raise fail(f"{container} is not running; run `make up ENV={spec.stage}`")
    return int(published.stdout.splitlines()[0].rsplit(":", 1)[1])


def sign(spec: StageSpec, registered: re.Match[str], password: str, mlflow_ca: Optional[str],
         key: Ed25519PrivateKey) -> None:
    """Sign the version the run registered, from here: the key never enters a container. Until it is signed no
    replica loads it (dev's replicas keep serving the newest signed version)."""
    name, version = registered["name"], int(registered["version"])
    port = spec.model_registry.port
    try:
        with StageReach(spec) as reach:
            if port.host_port is None:
                port = port.model_copy(update={"host_port": published_port(spec, model_registry_name(spec.stage),
                                                                           MLFLOW_PORT)})
            store = MlflowStore(f"{'https' if mlflow_ca else 'http'}://{reach.address('model registry', port)}",
                                BasicAuth(TRAINER, password), ca_certificate=mlflow_ca)
            sign_version(store, name, version, key, expected_sha256=registered["sha256"],
                         expected_by="the training run registered")
    except (Unreachable, StoreError, SigningError) as err:
        raise fail(f"{name} v{version} is registered but not signed, so no replica will load it: {err}") from None


def spec_file(spec: StageSpec, environments: Path) -> Path:
    """Where the stage is declared: its stage file, or an experiment's stack file."""
    if spec.experiment is not None:
        return project_root() / f"Pulumi.{spec.stage}.yaml"
    return stage_file(spec.stage, environments)


def stage_model(spec: StageSpec, model: Optional[str], environments: Path) -> str:
    """The model `--model` names, which the stage must declare; without `--model`, the stage's one model. Asks
    for no secret and no engine, so a wrong name is said before either."""
    declared = sorted(spec.models)
    if model is None:
        if len(declared) == 1:
            return declared[0]
        raise fail(f"{spec.stage} declares {len(declared)} models ({', '.join(declared) or 'none'}): name one with "
                   "--model", BAD_INPUT_EXIT)
    if model not in spec.models:
        raise SpecError(file=spec_file(spec, environments), field="models",
                        message=f"{spec.stage} declares no model '{excerpt(model)}'; its models: "
                                f"{', '.join(declared) or 'none'} (add models.<name> for a project under models/, "
                                "docs/models.md)")
    return model


def training_image(spec: StageSpec, model: str, environments: Path) -> str:
    """The model's training image the stack built on `training.build`, or the digest promoted to the stage."""
    if spec.training.build is not None:
        return model_image_name(spec.stage, "training", spec.training.build, BuildSettings.of(spec), model,
                                image_registry_server(spec))
    release = spec.models[model].release
    if release is None or release.images.training is None:
        raise SpecError(file=spec_file(spec, environments), field=f"models.{model}.release.images.training",
                        message=f"no training image of {model} is promoted to {spec.stage} yet; "
                                f"promote a release with `mlops promote --to {spec.stage}`")
    return release.images.training


def image_digest(spec: StageSpec, image: str) -> str:
    """The pushed digest when there is one, else the local image ID: both name the exact image content."""
    inspected = docker(spec, "image", "inspect", "--format", "{{json .RepoDigests}} {{.Id}}", image)
    if inspected.returncode != 0:
        how = "it builds the training image" if spec.training.build else "it pulls the promoted training image"
        raise fail(f"training image {image} is not on {spec.docker.url}; run `make up ENV={spec.stage}` ({how})")
    repo_digests, image_id = inspected.stdout.strip().rsplit(" ", 1)
    return next(iter(json.loads(repo_digests) or []), image_id)


def check_engine(spec: StageSpec) -> None:
    if docker(spec, "info", "--format", "{{.ServerVersion}}").returncode != 0:
        raise fail(f"no Docker engine answers at {spec.docker.url}")


def check_volume(spec: StageSpec, volume: str) -> None:
    """A volume the CLI mounts must be the stack's: `docker run` would silently create an empty one."""
    physical = volume_name(spec.stage, volume)
    if docker(spec, "volume", "inspect", physical).returncode != 0:
        raise fail(f"volume {physical} does not exist: the {spec.stage} stack is not up, or declares no "
                   f"{volume} volume; run `make up ENV={spec.stage}`")


def check_stack_is_up(spec: StageSpec) -> None:
    network = network_name(spec.stage)
    if docker(spec, "network", "inspect", network).returncode != 0:
        raise fail(f"network {network} does not exist: the {spec.stage} stack is not up; "
                   f"run `make up ENV={spec.stage}`")
    registry = model_registry_name(spec.stage)
    if spec.swarm is None:
        running = docker(spec, "container", "inspect", "--format", "{{.State.Running}}", registry).stdout.strip() == "true"
    else:
        running = swarm_training.task_running(docker(spec, "service", "ps", "--format", "{{.CurrentState}}", registry).stdout)
    if not running:
        raise fail(f"model registry {registry} is not running; run `make up ENV={spec.stage}`")


def run_of(spec: StageSpec, image: str, digest: str, name: str, password: str, mlflow_ca: Optional[str],
           training_args: list[str], with_datasets: bool = False) -> Run:
    return training_run(spec, name=name, image=image, digest=digest, args=training_args, password=password,
                        mlflow_ca=mlflow_ca, labels=stage_labels(spec, spec.stage), with_datasets=with_datasets)


def report(lines: Iterable[str]) -> Optional[re.Match[str]]:
    """Print a run's output, except the `REGISTERED` line: return that."""
    registered = None
    for line in lines:
        line = line.rstrip("\n")
        if match := REGISTERED.match(line):
            registered = match
        elif line.startswith("error:"):
            errors.print(line, style="red", markup=False, highlight=False, soft_wrap=True)
        else:
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    return registered


def stream_run(spec: StageSpec, run: Run) -> tuple[int, Optional[re.Match[str]]]:
    """Create the run, give it its secret files through `docker cp`'s standard input, then start it and print its
    output as it comes; return its exit code and `REGISTERED` line."""
    assert run.name is not None
    created = docker(spec, *docker_create_arguments(run))
    if created.returncode != 0:
        raise fail(f"could not create training run {run.name} on {spec.docker.url}: {created.stderr}")
    copied = subprocess.run(["docker", "cp", "-", f"{run.name}:{SECRETS_DIR}"],
                            input=secret_files_archive(run), capture_output=True, env=spec.docker.cli_environment())
    if copied.returncode != 0:
        raise fail(f"could not give training run {run.name} its secret files: {copied.stderr.decode(errors='replace')}")
    with subprocess.Popen(["docker", "start", "--attach", run.name], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1, env=spec.docker.cli_environment()) as process:
        assert process.stdout is not None
        registered = report(process.stdout)
    return process.returncode, registered


@reads_specs
def train(
    stage: str = typer.Option(..., "--stage", help="dev, staging, prod or exp-NAME: whose training image, network "
                                                   "and MLflow"),
    subset: float = typer.Option(1.0, "--subset", help="fraction (0, 1] of the data, for the model's entrypoint"),
    param: Optional[list[str]] = typer.Option(None, "--param", help="overrides a parameter of the model's project "
                                                                    "file, key=value, repeatable"),
    seed: int = typer.Option(0, "--seed", help="the seed the model's entrypoint is given"),
    model: Optional[str] = typer.Option(None, "--model", help="the model to train, one the stage declares; may be "
                                                              "left out when it declares one"),
    data: Optional[str] = typer.Option(None, "--data", help="train on this dataset of the model on the stage's "
                                                            "datasets volume: 'latest' or its sha256 (`mlops data "
                                                            "list`); default: the model project's default data"),
    environments: Path = ENVIRONMENTS_OPTION,
) -> None:
    """Train a model in its training image of the stage and register it as a new version in the stage's MLflow."""
    params = param or []
    if not 0 < subset <= 1:
        raise fail(f"--subset must be a fraction in (0, 1], got {subset}", BAD_INPUT_EXIT)
    check_params(params)
    if data is not None and not DATASET_NAME.fullmatch(data):
        raise fail(f"--data '{excerpt(data)}' is no dataset name: give 'latest', or a dataset's sha256 or at least its "
                   "first 8 hex characters (`mlops data list`)", BAD_INPUT_EXIT)
    spec = stage_spec(stage, environments)
    model_name = stage_model(spec, model, environments)
    if data is not None and spec.swarm is not None:
        raise fail(f"{stage} is a swarm stage: its datasets volume would be local to one node, so `mlops train --data` "
                   "works on single-host stages only", BAD_INPUT_EXIT)
    try:
        login = credentials.mlflow_login(spec, TRAINER)
        password, mlflow_ca = login.password, login.ca_certificate
        signing_key = private_key(credentials.model_signing_key(spec.stage), f"{spec.stage}'s mlops:{MODEL_SIGNING_KEY}")
        # Nodes pull the training image from the stage's registry with the credentials the run sends along.
        registry_password = credentials.registry_password(spec.stage) if spec.swarm is not None else ""
    except (credentials.MissingSecret, SigningError) as err:
        raise fail(str(err)) from None
    check_engine(spec)
    image = training_image(spec, model_name, environments)
    digest = image_digest(spec, image)
    check_stack_is_up(spec)
    if data is not None:
        check_volume(spec, DATASETS_VOLUME)

    training_args = ["--subset", str(subset), "--seed", str(seed), *[f"--param={p}" for p in params],
                     *(["--data", data] if data is not None else []), "--model-name", model_name]
    name = f"{spec.stage}-train-{uuid.uuid4().hex[:8]}"
    console.print(f"[bold]{name}[/bold]: training {model_name} in {escape(image)}", highlight=False, soft_wrap=True)
    if spec.swarm is not None:
        # Nodes pull the image by its digest.
        exit_code, lines = swarm_training.run_job(
            docker, spec, run_of(spec, digest, digest, name, password, mlflow_ca, training_args), registry_password,
            waiting=lambda why: console.print(f"{name} waits to be scheduled: {why}", markup=False, highlight=False))
        registered = report(lines)
    else:
        try:
            exit_code, registered = stream_run(
                spec, run_of(spec, image, digest, name, password, mlflow_ca, training_args,
                             with_datasets=data is not None))
        finally:
            # `--rm` removes it and its secrets' volume when it ends; this, when it never started or the CLI
            # is interrupted first.
            docker(spec, "rm", "--force", "--volumes", name)
    if exit_code == BAD_INPUT_EXIT:
        raise typer.Exit(BAD_INPUT_EXIT)
    if exit_code != 0:
        killed = " (killed: the memory limit is training.limits.memory_mb)" if exit_code == 137 else ""
        raise fail(f"training run {name} failed with exit code {exit_code}{killed}")
    if registered is None:
        raise fail(f"training run {name} exited 0 without its REGISTERED line: nothing says which version it registered")
    sign(spec, registered, password, mlflow_ca, signing_key)
    typer.echo(registered.group(0))
