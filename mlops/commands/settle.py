"""`mlops settle STAGE`: after `pulumi up` on a swarm stage, until Swarm has finished what the deploy started."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from mlops import settle as settling
from mlops.commands.specs import ENVIRONMENTS_OPTION, reads_specs
from mlops.commands.train import fail
from mlops.orphans import DockerError
from mlops_spec.loading import load_stages


@reads_specs
def settle(stage: str = typer.Argument(..., help="the stage `pulumi up` just deployed"),
           timeout: Optional[int] = typer.Option(None, min=1, help="seconds to wait at most; default: the longest "
                                                                   "rolling update of the stage's services"),
           environments: Path = ENVIRONMENTS_OPTION) -> None:
    """Wait until no service of a swarm STAGE is updating and each runs the tasks it declares. Exit 1 when Swarm
    rolled back or paused an update after `pulumi up` returned (the Pulumi state then holds a spec the cluster does
    not run: `pulumi refresh --stack STAGE` before anything else) or when it did not settle in time. Then remove
    the stage's secrets that no service mounts or would roll back to (Pulumi lets go of replaced ones, and
    `pulumi destroy` of all of them, without deleting them). A single-host stage has nothing to settle: `pulumi up`
    waited for its containers."""
    spec = load_stages([stage], environments)[0]
    console = Console(highlight=False, soft_wrap=True)
    if spec.swarm is None:
        console.print(f"{spec.stage} runs on a single host: Swarm rolls nothing back after pulumi up, nothing to settle")
        return
    limit_s = timeout or settling.longest_update_s(spec)
    try:
        settled = settling.settle(spec, limit_s)
        # While an update is under way, a secret unmounted now may be the one a rollback returns to.
        removals = [] if settled.timed_out else settling.remove_unmounted_secrets(spec)
    except DockerError as error:
        raise fail(f"{spec.stage}'s swarm manager at {spec.docker.url} did not answer: {error}") from None
    for removal in removals:
        if removal.refused:
            console.print(f"[yellow]kept secret {escape(removal.secret.name)}: {escape(removal.refused)}[/yellow]")
        else:
            console.print(f"removed secret {escape(removal.secret.name)}: no service mounts it or rolls back to it")
    if not settled.services:
        if removals:
            console.print(f"nothing of {spec.stage} runs on the swarm manager at {spec.docker.url}; the secrets "
                          f"`pulumi destroy` left are dealt with")
            return
        raise fail(f"no service of {spec.stage} runs on the swarm manager at {spec.docker.url}: deploy it first "
                   f"(`pulumi up --stack {spec.stage}`)")
    for state in settled.services:
        style = "red" if state.refused or state.in_progress else "green"
        console.print(f"[{style}]{escape(state.describe())}[/{style}]")
    refused = [state.name for state in settled.services if state.refused]
    if refused:
        raise fail(f"Swarm rolled back or paused {', '.join(refused)} after pulumi up returned: the cluster runs "
                   f"their previous spec and the Pulumi state does not know it; run `pulumi refresh --stack "
                   f"{spec.stage}`, fix the release and deploy again")
    if settled.timed_out:
        waiting = [state.name for state in settled.services if state.in_progress]
        raise fail(f"{', '.join(waiting)} did not settle within {limit_s} s")
    console.print(f"[green]settled[/green]: every service of {spec.stage} finished its update and runs its tasks")
