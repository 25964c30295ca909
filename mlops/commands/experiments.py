"""`mlops exp`: short-lived experiment stacks `exp-NAME`, driven through the Pulumi Automation API.

State lives in the backend of PULUMI_BACKEND_URL, by default the file backend `.pulumi-state/` of
the project `mlops` is run in. Self-managed backends (file, s3, ...) encrypt stack secrets (the image registry
password, the MLflow secret, a TLS host's client certificates) with PULUMI_CONFIG_PASSPHRASE or
PULUMI_CONFIG_PASSPHRASE_FILE, which must be set.
`exp up`, `exp list` and `exp down` need the Pulumi CLI; `exp gc` cleans orphaned Docker resources
without it, for a file backend, by reading the backend's stack list from disk.
"""
from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, Optional

import typer
from pulumi import automation as auto
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from components.docker_tls import CONFIG_NAMESPACE, missing_tls_keys, tls_set_commands
from mlops import orphans
from mlops.experiments import (
    DEFAULT_SOURCE,
    DEFAULT_TTL,
    EXPERIMENT_CONFIG_KEY,
    EXPERIMENT_PREFIX,
    ExperimentSettings,
    check_name,
    experiment_spec,
    experiment_stack,
    is_expired,
    settings_from_json,
)
from mlops.plan import PROJECT
from mlops.signing import new_signing_key, private_pem, public_pem
from mlops_spec.contract import DOCKER_TLS_KEYS, MODEL_SIGNING_KEY, TRUSTED_MODEL_KEYS
from mlops_spec.errors import SpecError
from mlops_spec.models import StageSpec
from mlops_spec.project import project_root

app = typer.Typer(no_args_is_help=True, help="Short-lived experiment stacks exp-NAME with a time to live.")
# Plain text: names, owners and Pulumi output are never read as markup, and lines never wrap mid-name.
console = Console(markup=False, highlight=False, soft_wrap=True)
errors = Console(stderr=True, highlight=False, soft_wrap=True)

SETTINGS_KEY = f"mlops:{EXPERIMENT_CONFIG_KEY}"
# Each experiment's own random secrets: its image registry's password, and the one MLflow derives its users' from.
SECRET_KEYS = ("mlops:registryPassword", "mlops:mlflowPassword")
PASSPHRASE_VARIABLES = ("PULUMI_CONFIG_PASSPHRASE", "PULUMI_CONFIG_PASSPHRASE_FILE")
ENDPOINT_OUTPUTS = ("serving_endpoint", "model_registry_url", "image_registry")
INSTALL_HINT = "install it with `curl -fsSL https://get.pulumi.com | sh` (or see https://www.pulumi.com/docs/install/)"
PULUMI_MISSING = f"the Pulumi CLI is not installed (no `pulumi` on PATH); {INSTALL_HINT}"
GC_WITHOUT_PULUMI = ("the Pulumi CLI is not installed: cleaning orphaned Docker resources only; to destroy expired "
                     f"experiments too, {INSTALL_HINT}")


class CommandFailed(Exception):
    """Something outside the user's input went wrong; the message is one line saying what to do."""


def _one_line_errors(command: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except (CommandFailed, orphans.DockerError) as err:
            errors.print(f"[red]error:[/red] {escape(str(err))}")
            raise typer.Exit(1) from None
        except auto.errors.CommandError as err:
            errors.print(f"[red]error:[/red] pulumi failed: {escape(_last_stderr_line(err))}")
            raise typer.Exit(1) from None
    return run


def _last_stderr_line(err: auto.errors.CommandError) -> str:
    stderr = str(err).rpartition(" stderr: ")[2]
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else "no error output"


def set_secret_config(stack: auto.Stack, key: str, value: str) -> None:
    """Store `value` as the stack's secret `key`. Not with `Stack.set_config`: the Automation API passes every config
    value as an argument of `pulumi config set` (LocalWorkspace.set_config; set_all_config and its JSON form do the
    same), which every local user reads in `ps`. `pulumi config set` without a value reads it from stdin instead."""
    workspace = stack.workspace
    try:
        subprocess.run(["pulumi", "config", "set", "--secret", key, "--stack", stack.name, "--non-interactive"],
                       input=value, text=True, capture_output=True, check=True, cwd=workspace.work_dir,
                       env={**os.environ, **workspace.env_vars})
    except subprocess.CalledProcessError as err:
        problem = (err.stderr.strip().splitlines() or [f"exit code {err.returncode}"])[-1]
        raise CommandFailed(f"storing the secret {key} of {stack.name} failed: {problem}") from None


def backend_url() -> str:
    return os.environ.get("PULUMI_BACKEND_URL") or f"file://{project_root() / '.pulumi-state'}"


def pulumi_installed() -> bool:
    return shutil.which("pulumi") is not None


def _workspace(create_backend: bool = False) -> auto.LocalWorkspace:
    """The workspace of the Pulumi project `mlops` is run in (`Pulumi.yaml`, `__main__.py`) on the backend."""
    if not pulumi_installed():
        raise CommandFailed(PULUMI_MISSING)
    url = backend_url()
    if not url.startswith(("https://", "http://")) and not any(os.environ.get(name) is not None
                                                                for name in PASSPHRASE_VARIABLES):
        raise CommandFailed(f"set PULUMI_CONFIG_PASSPHRASE (or PULUMI_CONFIG_PASSPHRASE_FILE): it encrypts the "
                            f"experiment's secrets in the backend {url}, and the same one is needed to manage it later")
    backend_dir = orphans.file_backend_dir(url)
    if create_backend and backend_dir is not None:
        backend_dir.mkdir(parents=True, exist_ok=True)
    try:
        return auto.LocalWorkspace(work_dir=str(project_root()), env_vars={"PULUMI_BACKEND_URL": url})
    except FileNotFoundError:
        raise CommandFailed(PULUMI_MISSING) from None
    except auto.errors.InvalidVersionError as err:
        raise CommandFailed(f"{err}; to upgrade, {INSTALL_HINT}") from None


def _backend_has_state() -> bool:
    """False for a file backend folder that was never used, where the Pulumi CLI cannot list anything."""
    backend_dir = orphans.file_backend_dir(backend_url())
    return backend_dir is None or (backend_dir / ".pulumi").is_dir()


def _stack_names(workspace: auto.LocalWorkspace) -> set[str]:
    if not _backend_has_state():
        return set()
    # Self-managed backends may answer fully qualified names (organization/project/stack).
    return {summary.name.rpartition("/")[2] for summary in workspace.list_stacks()}


def _experiment_stacks(workspace: auto.LocalWorkspace) -> set[str]:
    return {name for name in _stack_names(workspace) if name.startswith(EXPERIMENT_PREFIX)}


def _settings_of(stack: auto.Stack) -> Optional[ExperimentSettings]:
    """The experiment settings in the stack's config; None for a stack `mlops exp` did not write."""
    value = stack.get_all_config().get(SETTINGS_KEY)
    if value is None:
        return None
    try:
        return ExperimentSettings.from_config(stack.name, settings_from_json(stack.name, value.value))
    except SpecError:
        return None


def _endpoints(outputs: Mapping[str, auto.OutputValue]) -> dict[str, str]:
    return {key: str(outputs[key].value) for key in ENDPOINT_OUTPUTS if key in outputs}


def _default_owner() -> str:
    owner = os.environ.get("USER", "")
    if not owner:
        try:
            owner = subprocess.run(["git", "config", "user.email"], capture_output=True, text=True,
                                   check=False).stdout.strip()
        except FileNotFoundError:
            owner = ""
    if not owner:
        raise SpecError(file="--owner", field="", message="no owner known ($USER and git config user.email are unset); "
                                                          "pass --owner NAME")
    return owner


def _source_tls(workspace: auto.LocalWorkspace, stacks: set[str], stack_name: str, spec: StageSpec,
                source: str) -> dict[str, str]:
    """The config secrets the experiment reaches its TLS Docker host with, by key: copied from the stack of the stage
    it starts from, since the new stack has a config of its own; none for a host without TLS. A CommandFailed naming
    the keys to set when that stack lacks any, before the experiment's stack exists."""
    if not spec.docker.uses_tls:
        return {}
    configured = workspace.get_all_config(source) if source in stacks else {}
    values = {key: configured[f"{CONFIG_NAMESPACE}:{key}"].value for key in DOCKER_TLS_KEYS
              if f"{CONFIG_NAMESPACE}:{key}" in configured}
    missing = missing_tls_keys(values)
    if missing:
        create = "" if source in stacks else f"pulumi stack init {source}; "
        raise CommandFailed(f"{stack_name} reaches its Docker host {spec.docker.url} over TLS with the client "
                            f"certificates of stack {source}, which lacks {', '.join(missing)}: "
                            f"{create}{tls_set_commands(source, missing)} (docs/hosts-and-clusters.md)")
    return {f"{CONFIG_NAMESPACE}:{key}": values[key] for key in DOCKER_TLS_KEYS}


def _print_to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


def _destroy(stack: auto.Stack, workspace: auto.LocalWorkspace) -> None:
    try:
        stack.destroy(on_output=print, on_error=_print_to_stderr)
    except auto.errors.CommandError:
        raise CommandFailed(f"destroying {stack.name} failed (output above); run `mlops exp down "
                            f"{stack.name.removeprefix(EXPERIMENT_PREFIX)}` again once the cause is fixed") from None
    workspace.remove_stack(stack.name)


@app.command()
@_one_line_errors
def up(
    name: str = typer.Argument(..., help="experiment name: a DNS label; the stack is exp-NAME"),
    source: str = typer.Option(DEFAULT_SOURCE, "--from", help="stage whose spec the experiment starts from"),
    ttl: Optional[str] = typer.Option(None, "--ttl", help=f"time to live, e.g. 30m, 8h, 2d, 1h30m (10m..7d); "
                                                          f"{DEFAULT_TTL} for a new experiment, an existing "
                                                          "one keeps its expiry unless given"),
    assignments: list[str] = typer.Option([], "--set", metavar="KEY.PATH=VALUE",
                                          help="override a spec value, e.g. serving.replicas=2 or "
                                               "models.iris-classifier.replicas=2 (repeatable)"),
    owner: Optional[str] = typer.Option(None, "--owner", help="defaults to $USER, else git config user.email"),
) -> None:
    """Create or update experiment NAME from a stage's spec, deploy it, and print its endpoints."""
    now = datetime.now(timezone.utc)
    settings = ExperimentSettings.new(name, owner or _default_owner(), now, ttl or DEFAULT_TTL, source, assignments)
    stack_name = experiment_stack(name)
    spec = experiment_spec(stack_name, settings.to_config())
    workspace = _workspace(create_backend=True)
    stacks = _stack_names(workspace)
    tls_secrets = _source_tls(workspace, stacks, stack_name, spec, settings.source)
    is_new = stack_name not in stacks
    stack = (auto.Stack.create if is_new else auto.Stack.select)(stack_name, workspace)
    try:
        if not is_new:
            previous = _settings_of(stack)
            if previous is not None:
                kept = {"created_at": previous.created_at}
                if ttl is None:
                    kept |= {"ttl": previous.ttl, "expires_at": previous.expires_at}
                settings = ExperimentSettings(**{**settings.to_config(), **kept})
        stack.set_config(SETTINGS_KEY, auto.ConfigValue(json.dumps(settings.to_config())), path=False)
        configured = stack.get_all_config()
        for key in SECRET_KEYS:
            if key not in configured:
                set_secret_config(stack, key, secrets.token_urlsafe(24))
        for key, value in tls_secrets.items():
            if key not in configured or configured[key].value != value:
                set_secret_config(stack, key, value)
        if f"{CONFIG_NAMESPACE}:{MODEL_SIGNING_KEY}" not in configured:
            # An experiment trains and serves its own models, never promoted: a key of its own, trusted by it alone.
            signing_key = new_signing_key()
            set_secret_config(stack, f"{CONFIG_NAMESPACE}:{MODEL_SIGNING_KEY}", private_pem(signing_key))
            stack.set_config(f"{CONFIG_NAMESPACE}:{TRUSTED_MODEL_KEYS}", auto.ConfigValue(public_pem(signing_key)))
    except BaseException:
        # Nothing half-created: a stack that never got its settings is removed again.
        if is_new:
            workspace.remove_stack(stack_name)
        raise
    console.print(f"{stack_name}: owner {settings.owner}, from {settings.source}, expires {settings.expires_at}")
    try:
        result = stack.up(on_output=print, on_error=_print_to_stderr)
    except auto.errors.CommandError:
        raise CommandFailed(f"deploying {stack_name} failed (output above); fix the cause and run "
                            f"`mlops exp up {name}` again, or remove it with `mlops exp down {name}`") from None
    for key, endpoint in _endpoints(result.outputs).items():
        console.print(f"{key}: {endpoint}")


@app.command("list")
@_one_line_errors
def list_experiments() -> None:
    """List experiments: owner, created, expires, endpoints and whether they are active or expired."""
    workspace = _workspace()
    now = datetime.now(timezone.utc)
    table = Table(title=f"experiments in {backend_url()}")
    for column in ("name", "owner", "created", "expires", "endpoints", "status"):
        table.add_column(column)
    for stack_name in sorted(_experiment_stacks(workspace)):
        stack = auto.Stack.select(stack_name, workspace)
        settings = _settings_of(stack)
        endpoints = "\n".join(f"{key}: {url}" for key, url in _endpoints(stack.outputs()).items())
        if settings is None:
            table.add_row(stack_name, "", "", "", endpoints, f"unknown: no valid {SETTINGS_KEY} config")
            continue
        status = "expired" if is_expired(settings.info(), now) else "active"
        table.add_row(settings.name, settings.owner, settings.created_at, settings.expires_at, endpoints, status)
    console.print(table)


@app.command()
@_one_line_errors
def down(name: str = typer.Argument(..., help="experiment name (the stack is exp-NAME)")) -> None:
    """Destroy experiment NAME's resources, then remove its stack."""
    check_name(name)
    workspace = _workspace()
    stack_name = experiment_stack(name)
    if stack_name not in _experiment_stacks(workspace):
        raise CommandFailed(f"no experiment '{name}' in {backend_url()}; `mlops exp list` shows the experiments")
    _destroy(auto.Stack.select(stack_name, workspace), workspace)
    console.print(f"{stack_name}: destroyed and removed")


def _existing_stacks(workspace: Optional[auto.LocalWorkspace]) -> set[str]:
    """Every stack of the backend, read from disk for a file backend so that no Pulumi CLI is needed."""
    url = backend_url()
    backend_dir = orphans.file_backend_dir(url)
    if backend_dir is not None:
        stacks = orphans.stacks_in_file_backend(backend_dir, PROJECT)
        if stacks is None:
            raise CommandFailed(f"{backend_dir} holds no Pulumi state, so which experiments still exist is unknown; "
                                f"nothing removed (point PULUMI_BACKEND_URL at the backend the experiments were "
                                f"created in, or remove leftovers with `docker ... rm` after checking their "
                                f"{orphans.EXPERIMENT_LABEL} label)")
        return stacks
    if workspace is None:
        raise CommandFailed(f"without the Pulumi CLI the stacks of {url} cannot be listed, so nothing was removed; "
                            f"{INSTALL_HINT}")
    return _stack_names(workspace)


def _destroy_expired(workspace: auto.LocalWorkspace, dry_run: bool, name_prefix: str) -> list[str]:
    """Destroy and remove every experiment past its expiry; returns what failed."""
    failed = []
    now = datetime.now(timezone.utc)
    for stack_name in sorted(_experiment_stacks(workspace)):
        if not stack_name.startswith(f"exp-{name_prefix}"):
            continue
        stack = auto.Stack.select(stack_name, workspace)
        settings = _settings_of(stack)
        if settings is None or not is_expired(settings.info(), now):
            continue
        console.print(f"{stack_name}: expired at {settings.expires_at}, {'would destroy' if dry_run else 'destroying'}")
        if not dry_run:
            try:
                _destroy(stack, workspace)
            except CommandFailed as err:
                failed.append(str(err))
    return failed


def _remove_orphans(workspace: Optional[auto.LocalWorkspace], docker_host: Optional[str], dry_run: bool,
                    name_prefix: str) -> list[str]:
    """Remove the Docker resources of experiments whose stack is gone; returns what failed."""
    failed = []
    for leftover in orphans.find_orphans(_existing_stacks(workspace), docker_host):
        if not leftover.experiment.startswith(name_prefix):
            continue
        console.print(f"{'would remove' if dry_run else 'removing'} {leftover.kind} {leftover.name} "
                      f"of vanished experiment {leftover.experiment}")
        if not dry_run:
            try:
                orphans.remove(leftover, docker_host)
            except orphans.DockerError as err:
                failed.append(f"{leftover.kind} {leftover.name}: {err}")
    return failed


@app.command()
@_one_line_errors
def gc(
    dry_run: bool = typer.Option(False, "--dry-run", help="only show what would be destroyed and removed"),
    docker_host: Optional[str] = typer.Option(None, "--docker-host", help="Docker engine to clean; default: "
                                                                          "DOCKER_HOST or the current docker context"),
    name_prefix: str = typer.Option("", "--only", help="only experiments whose name starts with this prefix"),
) -> None:
    """Destroy expired experiments, then remove Docker resources of experiments whose stack is gone."""
    workspace = None
    failed = []
    if pulumi_installed():
        workspace = _workspace()
        failed += _destroy_expired(workspace, dry_run, name_prefix)
    else:
        errors.print(f"[yellow]note:[/yellow] {escape(GC_WITHOUT_PULUMI)}")
    failed += _remove_orphans(workspace, docker_host, dry_run, name_prefix)
    if failed:
        raise CommandFailed(f"{len(failed)} clean-up(s) failed: {'; '.join(failed)}")
