"""`mlops status STAGE`: every endpoint the stage publishes, probed from here, with its containers' health."""
from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mlops import rollout
from mlops import status as probing
from mlops.commands.specs import ENVIRONMENTS_OPTION, reads_specs
from mlops_spec.loading import load_stages


def _table(status: probing.StageStatus) -> Table:
    table = Table(title=f"{status.stage} on {status.docker_host}", title_justify="left")
    for column in ("service", "published address", "containers", "endpoint", "latency"):
        table.add_column(column, justify="right" if column == "latency" else "left")
    for row in status.rows:
        style = "green" if row.ok else "red"
        latency = "-" if row.latency_ms is None else f"{row.latency_ms:.0f} ms"
        table.add_row(f"[{style}]{escape(row.service)}[/{style}]", escape(row.address), escape(row.containers),
                      escape(row.answer), latency)
    return table


def _slots_table(status: probing.StageStatus) -> Table:
    table = Table(title="served models", title_justify="left")
    for column in rollout.COLUMNS:
        table.add_column(column)
    for slot in status.slots:
        table.add_row(*(escape(cell) for cell in slot.cells()))
    return table


@reads_specs
def status(stage: str = typer.Argument(..., help="dev, staging, prod or another stage file's name"),
           as_json: bool = typer.Option(False, "--json", help="one JSON document instead of the table"),
           environments: Path = ENVIRONMENTS_OPTION) -> None:
    """Probe every endpoint STAGE publishes from this machine, as a user would, next to the health its engine
    reports for the containers behind it; then one row per served model and slot: its version, replicas, weight,
    error rate, p99 latency, drift and rollout step (numbers from the stage's Prometheus, when it declares
    monitoring). Exit 1 when any endpoint does not answer as it should (a dead published port with healthy
    containers included) or a container is not healthy; no credentials needed."""
    result = probing.stage_status(load_stages([stage], environments)[0])
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
    else:
        console = Console(highlight=False, soft_wrap=True)
        console.print(_table(result))
        if result.engine_problem:
            console.print(f"[red]{escape(result.engine_problem)}[/red]")
        for refusal in result.refusals:
            console.print(f"[red]{escape(refusal)}[/red]")
        if result.slots:
            console.print(_slots_table(result))
        if result.slots_problem:
            console.print(escape(result.slots_problem))
        console.print("[green]ok[/green]: every endpoint answers" if result.ok else
                      f"[red]not ok[/red]: {', '.join(row.service for row in result.rows if not row.ok) or 'engine'}")
    if not result.ok:
        raise typer.Exit(1)
