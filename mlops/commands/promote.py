"""`mlops promote --from SRC --to DST --model M`: promotion as code, one reviewed change to the target spec."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from mlops import promote as promotion
from mlops import rollout
from mlops.commands.specs import reads_specs
from mlops_spec.errors import one_line


def _print_diff(diff: str, console: Console) -> None:
    styles = {"+": "green", "-": "red", "@": "cyan"}
    for line in diff.splitlines():
        style = styles.get(line[:1]) if not line.startswith(("+++", "---")) else "bold"
        console.print(f"[{style}]{escape(line)}[/{style}]" if style else escape(line))


def _refuse(message: str, code: int = 1) -> typer.Exit:
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[red]refused:[/red] {escape(one_line(message))}")
    return typer.Exit(code)


def _refusal(refusal: promotion.PromotionRefused) -> typer.Exit:
    """A missing --model is bad input (2); any other refusal is a rule the promotion would break (1)."""
    return _refuse(str(refusal), code=2 if isinstance(refusal, promotion.ModelNotNamed) else 1)


def _promote_green(target: str, model: Optional[str], dry_run: bool, environments: Path, console: Console) -> None:
    try:
        done = promotion.prepare_green_promotion(
            target, model, environments, lambda spec, name: rollout.gateway_state(spec, stack=target, model=name))
        if not dry_run:
            if done.file.read_text() != done.original:
                raise promotion.PromotionRefused(f"{done.file} changed while promoting; nothing written")
            promotion.write_atomically(done.file, done.updated)
    except promotion.PromotionRefused as refusal:
        raise _refusal(refusal) from None
    _print_diff(done.unified_diff(), console)
    what = f"{target}'s green {done.model} v{done.green.version} as its blue"
    if dry_run:
        console.print(f"[yellow]dry run:[/yellow] would promote {what}; nothing written")
    else:
        console.print(f"[green]promoted[/green] {what}; commit {done.file.name} and open a pull request")


@reads_specs
def promote(source: Optional[str] = typer.Option(None, "--from", help="the stage whose release is promoted, e.g. "
                                                                      "staging"),
            target: str = typer.Option(..., "--to", help="the stage that receives it, e.g. prod"),
            model: Optional[str] = typer.Option(None, "--model", help="the model whose release is promoted; the "
                                                "other models' pins stay as they are. Default: the one model SRC "
                                                "(with --green: DST) serves"),
            green: bool = typer.Option(False, "--green", help="instead of --from: make the model's green in --to, "
                                                              "once its rollout finished at 100 %, its new blue"),
            version: Optional[int] = typer.Option(None, "--version", min=1, help="promote exactly this version of "
                                                  "the model in SRC (SRC follows its newest: a version registered "
                                                  "meanwhile is not promoted); default: the version SRC runs"),
            dry_run: bool = typer.Option(False, "--dry-run", help="check everything and show the diff; copy and write nothing"),
            environments: Path = typer.Option(None, help="the specs folder, inside a git work tree; "
                                                                   "default: the project's")) -> None:
    """Copy SRC's release of one model (its version and images, byte for byte) into DST's registries and pin it as
    models.<model>.release in DST's spec, after checking DST's gates of that model, as MLflow user `promoter`.
    Secrets: MLOPS_REGISTRY_PASSWORD_<STAGE> and MLOPS_MLFLOW_PASSWORD_<STAGE>, else the stacks' config
    (mlops:registryPassword, mlops:mlflowPassword). With --green: the model's green in DST, which its gateway rolled
    out to 100 %, becomes its release (DST's spec only)."""
    console = Console(highlight=False, soft_wrap=True)
    if green == (source is not None):
        raise _refuse("give either --from STAGE or --green", code=2)
    if green and version is not None:
        raise _refuse("--version picks what --from promotes; --green promotes the green the stage file names", code=2)
    if source is None:  # --green
        _promote_green(target, model, dry_run, environments, console)
        return
    try:
        with promotion.Promoter(environments) as promoter:
            planned = promoter.prepare(source, target, model, version)
            done = planned if dry_run else promoter.apply(planned)
    except promotion.PromotionRefused as refusal:
        raise _refusal(refusal) from None
    release = done.release
    _print_diff(done.unified_diff(), console)
    what = (f"{release.model.name} v{release.model.version} of {source} as v{release.target_version} of {target} "
            f"(sha256 {release.model.sha256[:12]}…)")
    if dry_run:
        console.print(f"[yellow]dry run:[/yellow] would promote {what}; nothing copied or written")
    else:
        console.print(f"[green]promoted[/green] {what}; commit {done.target_file.name} and open a pull request")
