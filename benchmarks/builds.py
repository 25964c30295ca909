"""`docker build` as the figures use it: timed, with each Dockerfile step classified as cached or executed.

These builds use the classic builder, whose output names every step and says `Using cache` for each one
it did not run, which is what the rebuild figure counts (`docker buildx` is not installed here to print
BuildKit's). The stage itself, like the provider, builds with BuildKit (`tests/engine.py`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mlops import plan
from mlops_spec.models import StageSpec
from mlops_spec.project import REPO_ROOT

STEP = re.compile(r"^Step \d+/\d+ : (?P<instruction>.*)$", re.MULTILINE)
# Steps that create nothing: the base image and build arguments declared before it.
NOT_BUILT = ("FROM ", "ARG ")


@dataclass(frozen=True)
class Build:
    seconds: float
    executed: list[str]
    """The Dockerfile instructions that ran rather than coming from the cache."""
    cached: int
    image_id: str


@dataclass(frozen=True)
class ImageBuild:
    """What the stage's program asks the engine to build: `mlops plan`'s `docker:index/image:Image` inputs."""
    name: str
    context: Path
    args: dict[str, str]
    target: Optional[str] = None


def copied(image: ImageBuild, destination: Path) -> ImageBuild:
    """`image` with its context copied to `destination` as hard links (the wheels are large): replace a file
    there (unlink, then write) to change it; writing into one would change the original too."""
    shutil.copytree(image.context, destination, copy_function=os.link)
    return dataclasses.replace(image, context=destination)


def stage_builds(stack: str, spec: StageSpec) -> dict[str, ImageBuild]:
    """The images the stage builds, keyed by their repository name (`training`, `serving`, `mlflow`, ...)."""
    builds = {}
    for resource in plan.render(stack, spec):
        if resource.type == "docker:index/image:Image":
            build = resource.inputs["build"]
            repository = resource.inputs["imageName"].rsplit("/", 1)[1].split(":")[0]
            builds[repository] = ImageBuild(name=repository, context=REPO_ROOT / build["context"],
                                            args=build.get("args", {}), target=build.get("target"))
    return builds


def build(image: ImageBuild, tag: str, no_cache: bool = False) -> Build:
    command = ["docker", "build", "--tag", tag, "--file", str(image.context / "Dockerfile")]
    command += [argument for key, value in sorted(image.args.items()) for argument in ("--build-arg", f"{key}={value}")]
    command += ["--target", image.target] if image.target else []
    command += ["--no-cache"] if no_cache else []
    started = time.perf_counter()
    finished = subprocess.run([*command, str(image.context)], capture_output=True, text=True,
                              env={**os.environ, "DOCKER_BUILDKIT": "0"})
    seconds = time.perf_counter() - started
    if finished.returncode != 0:
        raise RuntimeError(f"docker build of {image.context} failed:\n{finished.stdout[-3000:]}\n{finished.stderr[-3000:]}")
    executed, cached = classify_steps(finished.stdout)
    return Build(seconds=seconds, executed=executed, cached=cached, image_id=image_id(tag))


def classify_steps(output: str) -> tuple[list[str], int]:
    """The instructions the classic builder executed, and how many it took from its cache."""
    steps = list(STEP.finditer(output))
    executed, cached = [], 0
    for step, following in zip(steps, [*steps[1:], None]):
        instruction = step["instruction"]
        if instruction.startswith(NOT_BUILT):
            continue
        log = output[step.end():following.start() if following else len(output)]
        if "Using cache" in log:
            cached += 1
        else:
            executed.append(instruction)
    return executed, cached


def image_exists(reference: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", reference], capture_output=True).returncode == 0


def image_id(reference: str) -> str:
    return _inspect(reference)["Id"]


def image_layers(reference: str) -> list[str]:
    """The image's filesystem layers (diff IDs): steps that only set metadata add none."""
    return _inspect(reference)["RootFS"]["Layers"]


def image_size(reference: str) -> int:
    return _inspect(reference)["Size"]


def _inspect(reference: str) -> dict:
    found = subprocess.run(["docker", "image", "inspect", reference], capture_output=True, text=True, check=True)
    return json.loads(found.stdout)[0]


def remove_image(reference: str) -> None:
    subprocess.run(["docker", "image", "rm", reference], capture_output=True, text=True)


def remove_if_untagged(image: str) -> None:
    """Drop an image nothing names any more (removing one by ID would also untag it wherever it is named)."""
    if image_exists(image) and not _inspect(image)["RepoTags"]:
        remove_image(image)
