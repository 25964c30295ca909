"""The `mlops` command: every command is a module under `mlops.commands`."""
from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape

from components.engine_facts import operators_docker_cli, reading_engines
from mlops.commands import data, diff, drift, experiments, parity, promote, settle, sign, specs, status, train
from mlops_spec.errors import NotInProject, SpecError

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  help="The MLOps stack as code: validate, plan, train, diff, promote, run experiments and check a stage.")
app.command()(specs.stages)
app.command()(specs.validate)
app.command()(specs.plan)
app.command()(diff.diff)
app.command()(parity.parity)
app.command()(promote.promote)
app.command()(sign.sign)
app.command()(train.train)
app.command()(drift.drift)
app.command()(status.status)
app.command()(settle.settle)
app.add_typer(experiments.app, name="exp")
app.add_typer(data.app, name="data")


def main() -> None:
    try:
        with reading_engines(operators_docker_cli):
            app()
    except (SpecError, NotInProject) as err:
        # Messages quote input, which must never be read as markup or emoji codes.
        Console(stderr=True).print(f"[red]error:[/red] {escape(str(err))}", highlight=False, soft_wrap=True,
                                   emoji=False)
        sys.exit(2)
