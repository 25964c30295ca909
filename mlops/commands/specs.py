"""`mlops validate` and `mlops plan`: what a stage declares, without any credentials or Pulumi CLI."""
from __future__ import annotations

import functools
import json
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console

from mlops import plan as planning
from mlops_spec.loading import load_all_stages, load_stages, stage_file
from mlops_spec.model_project import load_model_project
from mlops_spec.models import ModelPin, ServedModel
from mlops_spec.project import environments_dir, project_of, working_on
from mlops_spec.rules import promotion_chain, promotion_order

console = Console()


class OutputFormat(str, Enum):
    text = "text"
    json = "json"


ENVIRONMENTS_OPTION = typer.Option(None, "--environments", file_okay=False,
                                   help="folder with base.yaml and the stage files; default: environments/ of the "
                                        "project you are in")


def reads_specs(command: Callable[..., Any]) -> Callable[..., Any]:
    """Run `command` on its `--environments` folder (default: the specs of the project the current directory is
    in) and on the project that folder belongs to, so specs and the build contexts they name come from one clone.
    The option's default is None, but `command` always gets a folder: it declares `environments: Path`."""
    @functools.wraps(command)
    def run(*args: Any, environments: Optional[Path] = None, **kwargs: Any) -> Any:
        folder = environments or environments_dir()
        with working_on(project_of(folder)):
            return command(*args, environments=folder, **kwargs)
    return run


def served_line(model: ServedModel) -> str:
    """What a stage serves of one model: its version, replicas and green."""
    def version(pin: ModelPin) -> str:
        return "newest version" if pin.version == "latest" else f"version {pin.version}"
    green = model.green_pin
    traffic = model.deployment.traffic
    return (f"{model.name}, {version(model.pin)}, {model.replicas} replica(s)"
            + ("" if green is None else f"; green {version(green)} at {traffic.green}%"))


@reads_specs
def validate(stages: Optional[list[str]] = typer.Argument(None, help="stages to check; every stage when none"),
             environments: Path = ENVIRONMENTS_OPTION) -> None:
    """Validate stage specs: schema, invariants, promotions, and ports shared across stages on one Docker host; and
    the model project of every stage that builds its model's images."""
    every = load_all_stages(environments)
    for spec in load_stages(stages, environments) if stages else [every[name] for name in promotion_order(every)]:
        if spec.builds_workloads:
            for model in sorted(spec.models):
                load_model_project(model)
        served = "; ".join(served_line(model) for model in spec.served_models())
        console.print(f"[green]ok[/green] {spec.stage}: {f'serving {served}' if served else 'nothing promoted yet: no serving'}",
                      highlight=False, soft_wrap=True)


@reads_specs
def stages(output: OutputFormat = typer.Option(OutputFormat.text, "--format", help="text or json"),
           chain: Optional[str] = typer.Option(None, "--chain", metavar="STAGE",
                                               help="only the stages a release passes on its way to STAGE, from the "
                                                    "stage that builds it"),
           environments: Path = ENVIRONMENTS_OPTION) -> None:
    """List the stages in promotion order, each after the stage it is promoted from: what workflows iterate over
    (with --format json, each with the models it serves)."""
    every = load_all_stages(environments)
    order = promotion_order(every)
    if chain is not None:
        stage_file(chain, environments)
        order = promotion_chain(every, chain)
    if output is OutputFormat.json:
        typer.echo(json.dumps({"stages": [{"name": name, "kind": every[name].kind, "promote_from": every[name].promote_from,
                                           "swarm": every[name].swarm is not None, "docker_url": every[name].docker.url,
                                           "models": [model.name for model in every[name].served_models()]}
                                          for name in order],
                               "promotions": [[every[name].promote_from, name] for name in order
                                              if every[name].promote_from is not None]}))
        return
    for name in order:
        spec = every[name]
        where = "swarm" if spec.swarm is not None else "host"
        source = f"promoted from {spec.promote_from}" if spec.promote_from else "builds its images"
        console.print(f"{name:<16} {spec.kind:<8} {where:<6} {source}", highlight=False, markup=False)


@reads_specs
def plan(stage: str = typer.Argument(..., help="a stage (see `mlops stages`)"),
         output: OutputFormat = typer.Option(OutputFormat.text, "--format", help="text or json"),
         environments: Path = ENVIRONMENTS_OPTION) -> None:
    """Run the stage's Pulumi program under the mock runtime and list every resource it declares."""
    spec = load_stages([stage], environments)[0]
    resources = planning.render(stage, spec)
    if output is OutputFormat.json:
        typer.echo(json.dumps({"stack": stage, "resources": [r.to_json() for r in resources]}, indent=2))
        return
    served = spec.served_models()
    if not served:
        console.print(f"[yellow]{stage}: nothing promoted yet: network, stores and registries only, no serving "
                      f"(promote a release with `mlops promote --to {stage}`)[/yellow]")
    for model in served:
        console.print(f"{stage}: serving {served_line(model)}", highlight=False, markup=False)
    console.print(f"[bold]{stage}[/bold]: {len(resources)} resources")
    for resource in resources:
        options = [name for name, on in (("protected", resource.protect), ("retained on delete", resource.retain_on_delete),
                                          ("delete before replace", resource.delete_before_replace)) if on]
        marks = "".join(f" [magenta]{option}[/magenta]" for option in options)
        parent = f" (parent {resource.parent})" if resource.parent else ""
        console.print(f"[cyan]{resource.type}[/cyan] [bold]{resource.name}[/bold]{parent}{marks}", highlight=False, soft_wrap=True)
        if (policy := planning.update_policy(resource)) is not None:
            console.print(f"    update policy: {policy}", highlight=False, soft_wrap=True, markup=False)
        for path, value in planning.flatten(resource.inputs).items():
            console.print(f"    {path} = {json.dumps(value)}", highlight=False, soft_wrap=True, markup=False)
