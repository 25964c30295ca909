"""`mlops drift --stage STAGE [--model MODEL]`: the input drift the stage's Prometheus measures for its served
models (or one of them), against its declared threshold."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from mlops.commands.specs import ENVIRONMENTS_OPTION, reads_specs
from mlops.commands.train import BAD_INPUT_EXIT, fail, stage_model
from mlops.drift import drift_scores
from mlops.reach import StageReach, Unreachable
from mlops.rollout import PrometheusUnreachable, prometheus_query, prometheus_url
from mlops_spec.loading import load_stages

DRIFTED_EXIT = 1


@reads_specs
def drift(stage: str = typer.Option(..., "--stage", help="the stage whose serving traffic is checked"),
          model: Optional[str] = typer.Option(None, "--model", help="check this served model only; default: every "
                                                                    "model the stage serves"),
          environments: Path = ENVIRONMENTS_OPTION) -> None:
    """Print each feature's drift score (PSI of the replicas' recent inputs against the training data of their
    model), of every served model or of --model.

    Exit 0: every score is at or below the stage's monitoring.drift_threshold (or none is measured yet),
    1: a feature drifted above it, 2: bad input or no answer from the stage's Prometheus."""
    spec = load_stages([stage], environments)[0]
    if model is not None:
        stage_model(spec, model, environments)
        if spec.models[model].release is None:
            raise fail(f"{stage} does not serve {model} (models.{model} has no release), so it has no drift to "
                       "check", BAD_INPUT_EXIT)
    if spec.monitoring is None:
        raise fail(f"{stage} declares no monitoring, so nothing measures its drift; add a 'monitoring' section",
                   BAD_INPUT_EXIT)
    threshold = spec.monitoring.drift_threshold
    try:
        with StageReach(spec) as reach:
            scores = drift_scores(prometheus_query(prometheus_url(spec, reach)), model)
    except (Unreachable, PrometheusUnreachable) as error:
        raise fail(str(error), BAD_INPUT_EXIT) from None
    console = Console(highlight=False, soft_wrap=True)
    if not scores:
        of = f" of {model}" if model else ""
        console.print(f"{stage}: no drift scores{of} yet (a replica reports them once its window holds "
                      f"{spec.monitoring.drift_window_rows} rows)", markup=False)
        return
    table = Table("model", "slot", "version", "feature", "PSI", title=f"{stage}: input drift (threshold {threshold})")
    for score in scores:
        style = "bold red" if score.psi > threshold else None
        table.add_row(score.model, score.slot, score.model_version, score.feature, f"{score.psi:.3f}", style=style)
    console.print(table)
    drifted = sorted({f"{score.feature} of {score.model}" for score in scores if score.psi > threshold})
    if drifted:
        console.print(f"drifted above {threshold}: {', '.join(drifted)}", markup=False)
        raise typer.Exit(DRIFTED_EXIT)
