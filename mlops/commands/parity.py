"""`mlops parity STAGE STAGE...`: fail on any spec difference that base.yaml's `parity.may_differ` does not allow."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from mlops import parity as parity_rules
from mlops.commands.specs import reads_specs
from mlops_spec.loading import load_all_stages
from mlops_spec.rules import promotion_order


def _values(difference: parity_rules.Difference) -> str:
    return ", ".join(f"{stage}={value!r}" for stage, value in difference.values.items())


@reads_specs
def parity(stages: Optional[list[str]] = typer.Argument(None, help="two or more stages, e.g. staging prod; "
                                                                   "default: every staging and prod kind stage"),
           environments: Path = typer.Option(None, help="the specs folder; default: the project's")) -> None:
    """Check that stages declare the same thing except where base.yaml's parity.may_differ allows."""
    console = Console(highlight=False, soft_wrap=True)
    if not stages:
        every = load_all_stages(environments)
        stages = [name for name in promotion_order(every) if not every[name].builds_workloads]
    differences = parity_rules.check_parity(stages, environments)
    offending = [d for d in differences if not d.allowed]
    for difference in differences:
        if difference.allowed:
            console.print(f"[dim]allowed[/dim]   {escape(difference.path)}: {escape(_values(difference))}")
    for difference in offending:
        console.print(f"[red]differs[/red]   {escape(difference.path)}: {escape(_values(difference))}")
    together = " and ".join(stages)
    if offending:
        console.print(f"[red]{together}: {len(offending)} difference(s) outside parity.may_differ of base.yaml[/red]")
        raise typer.Exit(1)
    console.print(f"[green]ok[/green] {together}: at parity ({len(differences)} allowed difference(s))")
