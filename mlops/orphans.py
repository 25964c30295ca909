"""Docker resources left behind by experiments whose stacks no longer exist, found by label.

Only containers, networks and volumes labelled `mlops.experiment=<name>` are candidates; anything
labelled for a shipped stage (`mlops.stage` dev, staging or prod) never is, and neither is anything
of an experiment whose stack `exp-<name>` is still in the backend. Which stacks exist must be known
for certain: `stacks_in_file_backend` answers None, not "none", for a folder without Pulumi state,
because an empty answer would make every labelled resource look orphaned.
"""
from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

from mlops.experiments import experiment_stack

EXPERIMENT_LABEL = "mlops.experiment"
STAGE_LABEL = "mlops.stage"
# Removal order: containers first, since they hold on to networks and volumes.
KINDS = ("container", "network", "volume")
STATE_FORMATS = ("json", "yaml")
COMPRESSIONS = (".gz", ".zst")


class DockerError(Exception):
    """A docker command failed; the message is its last line of output."""


@dataclass(frozen=True)
class Leftover:
    kind: str
    ref: str  # the ID of containers and networks (a name can be reused before removal), a volume's name
    name: str
    experiment: str


def file_backend_dir(backend_url: str) -> Optional[Path]:
    """The folder of a `file://` backend (the Pulumi state is in its `.pulumi/`), None for other backends."""
    parts = urlsplit(backend_url)
    if parts.scheme != "file":
        return None
    return Path((parts.netloc + parts.path) or "~").expanduser()


def stacks_in_file_backend(root: Path, project: str) -> Optional[set[str]]:
    """Stack names of `project` in a file backend; None when `root` holds no Pulumi state at all.

    Reads both layouts of the Pulumi file backend: `.pulumi/stacks/<project>/<stack>.json` and the
    legacy `.pulumi/stacks/<stack>.json`, optionally compressed; `.bak` files are not stacks.
    """
    if not (root / ".pulumi").is_dir():
        return None
    stacks_dir = root / ".pulumi" / "stacks"
    names: set[str] = set()
    for folder in (stacks_dir / project, stacks_dir):
        for file in folder.glob("*"):
            name = file.name
            for compression in COMPRESSIONS:
                name = name.removesuffix(compression)
            stack, dot, extension = name.rpartition(".")
            if file.is_file() and dot and stack and extension in STATE_FORMATS:
                names.add(stack)
    return names


def _docker(environment: Optional[Mapping[str, str]], *args: str) -> str:
    """`docker ARGS` with `environment` (a stage's: `DockerHost.cli_environment`), or this process's when None."""
    try:
        result = subprocess.run(["docker", *args], capture_output=True, text=True, check=False, env=environment)
    except FileNotFoundError:
        raise DockerError("the docker command is not installed") from None
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        raise DockerError(f"`{' '.join(args[:2])}` failed: {lines[-1] if lines else f'exit code {result.returncode}'}")
    return result.stdout


def _at(host: Optional[str]) -> Optional[dict[str, str]]:
    """The environment of `docker` at `host`, named by the operator with `--docker-host`: TLS, if the host speaks
    it, is as the operator's own DOCKER_TLS_VERIFY and DOCKER_CERT_PATH say."""
    return {**os.environ, "DOCKER_HOST": host} if host else None


def labelled(kind: str, host: Optional[str] = None) -> list[Leftover]:
    """Resources of `kind` labelled with an experiment name and that experiment's stack as their stage."""
    listing = ["container", "ls", "--all"] if kind == "container" else [kind, "ls"]
    refs = _docker(_at(host), *listing, "--quiet", "--filter", f"label={EXPERIMENT_LABEL}").split()
    if not refs:
        return []
    found = []
    for item in json.loads(_docker(_at(host), kind, "inspect", *refs)):
        labels = (item["Config"]["Labels"] if kind == "container" else item["Labels"]) or {}
        experiment = labels.get(EXPERIMENT_LABEL, "")
        if not experiment or labels.get(STAGE_LABEL) != experiment_stack(experiment):
            continue
        ref = item["Name"] if kind == "volume" else item["Id"]
        found.append(Leftover(kind=kind, ref=ref, name=item["Name"].lstrip("/"), experiment=experiment))
    return found


def find_orphans(existing_stacks: set[str], host: Optional[str] = None) -> list[Leftover]:
    """Labelled resources of experiments whose stack is not in `existing_stacks`, in removal order."""
    return [leftover for kind in KINDS for leftover in labelled(kind, host)
            if experiment_stack(leftover.experiment) not in existing_stacks]


def remove(leftover: Leftover, host: Optional[str] = None) -> None:
    # --force stops a running container first; networks and volumes have nothing to stop.
    _docker(_at(host), leftover.kind, "rm", *(["--force"] if leftover.kind == "container" else []), leftover.ref)
