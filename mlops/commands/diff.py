"""`mlops diff A B`: the resources two renderings of a stage declare differently, for terminals and PRs."""
from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from mlops import diff as diffing
from mlops.commands.specs import reads_specs

STYLES = {"added": "green", "removed": "red", "changed": "yellow"}
# Distinct from 1 (the sides differ) so CI can fail on data loss alone.
EXIT_DATA_AT_RISK = 3


class DiffFormat(str, Enum):
    text = "text"
    markdown = "markdown"
    json = "json"


def _print_text(result: diffing.StackDiff, console: Console) -> None:
    warning = result.risk_summary()
    if warning:
        console.print(f"[bold red]⚠ {escape(warning)}[/bold red]")
    console.print(f"[bold]{escape(result.summary())}[/bold]")
    for change in result.changes:
        style = STYLES[change.status]
        verdict = f" [bold]→ {escape(diffing.describe_action(change))}[/bold]" if change.status == "changed" else ""
        console.print(f"[{style}]{diffing.MARKS[change.status]} {escape(change.name)}[/{style}] "
                      f"[dim]{escape(change.type)} ({change.status})[/dim]{verdict}")
        if change.data_risk:
            console.print(f"    [bold red]⚠ {escape(change.data_risk)}[/bold red]")
        for note in change.notes:
            console.print(f"    [dim]note: {escape(note)}[/dim]")
        if change.update_policy:
            console.print(f"    update policy: {escape(change.update_policy)}")
        for fc in change.fields:
            if change.status == "changed":
                console.print(f"    {escape(fc.path)}: [red]{escape(repr(fc.before))}[/red] → "
                              f"[green]{escape(repr(fc.after))}[/green]")
            else:
                value = fc.after if change.status == "added" else fc.before
                console.print(f"    [{style}]{escape(fc.path)}: {escape(repr(value))}[/{style}]")


@reads_specs
def diff(before: str = typer.Argument(..., metavar="A", help="STAGE or STAGE@GITREF, e.g. staging@origin/main"),
         after: str = typer.Argument(..., metavar="B", help="STAGE or STAGE@GITREF, e.g. staging"),
         output: DiffFormat = typer.Option(DiffFormat.text, "--format", help="text, markdown (a PR comment) or json"),
         environments: Path = typer.Option(None, help="the specs folder (inside a git work tree for @GITREF); "
                                                                "default: the project's"),
         fail_on_data_loss: bool = typer.Option(False, "--fail-on-data-loss",
                                                help="exit 3 when a data volume or protected resource would be "
                                                     "replaced or deleted")) -> None:
    """Compare what two stage renderings declare and what the provider will do (update in place or replace).

    Exit 0: identical, 1: they differ, 2: bad input, 3: with --fail-on-data-loss, a data volume or protected
    resource would be replaced or deleted."""
    result = diffing.diff_stages(diffing.StageRef.parse(before), diffing.StageRef.parse(after), environments)
    if output is DiffFormat.json:
        typer.echo(json.dumps(result.to_json(), indent=2, default=str))
    elif output is DiffFormat.markdown:
        typer.echo(diffing.to_markdown(result), nl=False)
    else:
        _print_text(result, Console(highlight=False, soft_wrap=True))
    if fail_on_data_loss and result.at_risk:
        raise typer.Exit(EXIT_DATA_AT_RISK)
    if result.differs:
        raise typer.Exit(1)
