"""`mlops promote --from SRC --to DST`: promotion as code, one reviewed change to the target spec."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from mlops import promote as promotion
from mlops.commands.specs import reads_specs
from mlops.errors import one_line


def _print_diff(diff: str, console: Console) -> None:
    styles = {"+": "green", "-": "red", "@": "cyan"}
    for line in diff.splitlines():
        style = styles.get(line[:1]) if not line.startswith(("+++", "---")) else "bold"
        console.print(f"[{style}]{escape(line)}[/{style}]" if style else escape(line))


@reads_specs
def promote(source: str = typer.Option(..., "--from", help="the stage whose release is promoted, e.g. staging"),
            target: str = typer.Option(..., "--to", help="the stage that receives it, e.g. prod"),
            dry_run: bool = typer.Option(False, "--dry-run", help="check everything and show the diff; copy and write nothing"),
            environments: Optional[Path] = typer.Option(None, help="the specs folder, inside a git work tree; "
                                                                   "default: the project's")) -> None:
    """Copy SRC's release (model and images, byte for byte) into DST's registries and pin it in DST's spec,
    after checking DST's gates, as MLflow user `promoter`. Secrets: MLOPS_REGISTRY_PASSWORD_<STAGE> and
    MLOPS_MLFLOW_PASSWORD_<STAGE>, else the stacks' config (mlops:registryPassword, mlops:mlflowPassword)."""
    console = Console(highlight=False, soft_wrap=True)
    try:
        with promotion.Promoter(environments) as promoter:
            planned = promoter.prepare(source, target)
            done = planned if dry_run else promoter.apply(planned)
    except promotion.PromotionRefused as refusal:
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"[red]refused:[/red] {escape(one_line(str(refusal)))}")
        raise typer.Exit(1) from None
    release = done.release
    _print_diff(done.unified_diff(), console)
    what = (f"{release.model.name} v{release.model.version} of {source} as v{release.target_version} of {target} "
            f"(sha256 {release.model.sha256[:12]}…)")
    if dry_run:
        console.print(f"[yellow]dry run:[/yellow] would promote {what}; nothing copied or written")
    else:
        console.print(f"[green]promoted[/green] {what}; commit {done.target_file.name} and open a pull request")
