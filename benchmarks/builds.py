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
from typing import Callable, Mapping, Optional

from mlops import plan
from mlops_spec.models import StageSpec
from mlops_spec.project import REPO_ROOT

STEP = re.compile(r"^Step \d+/\d+ : (?P<instruction>.*)$", re.MULTILINE)
# Steps that create nothing: the base image and build arguments declared before it.
NOT_BUILT = ("FROM ", "ARG ")
# A model's images are built FROM a platform image the same stage builds, named by this build argument
# (images/model/Dockerfile).
PLATFORM_ARG = "PLATFORM_IMAGE"


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
    dockerfile: Optional[Path] = None
    """Default: the context's Dockerfile; a model's images use images/model/Dockerfile on its project folder."""


def copied(image: ImageBuild, destination: Path) -> ImageBuild:
    """`image` with its context copied to `destination` as hard links (the wheels are large): replace a file
    there (unlink, then write) to change it; writing into one would change the original too."""
    shutil.copytree(image.context, destination, copy_function=os.link)
    return dataclasses.replace(image, context=destination)


def repository(image_name: str) -> str:
    """`training` of `mlops-bench/training:<hash>` or `localhost:5000/bench/training:<hash>`."""
    return image_name.rsplit("/", 1)[1].split(":")[0]


def stage_builds(stack: str, spec: StageSpec) -> dict[str, ImageBuild]:
    """The images the stage builds, keyed by their repository name (`training`, `serving`, `mlflow`,
    `iris-classifier-serving`, ...)."""
    builds = {}
    for resource in plan.render(stack, spec):
        if resource.type == "docker:index/image:Image":
            build = resource.inputs["build"]
            name = repository(resource.inputs["imageName"])
            builds[name] = ImageBuild(name=name, context=REPO_ROOT / build["context"], args=build.get("args", {}),
                                      target=build.get("target"), dockerfile=REPO_ROOT / build["dockerfile"])
    return builds


def build_all(images: Mapping[str, ImageBuild], tag: Callable[[str], str]) -> dict[str, Build]:
    """Every image under `tag(its name)`: the platform images first, then each model image FROM its platform
    image's tag (the stage's own name for it exists only once the stage built it)."""
    built = {}
    for image in sorted(images.values(), key=lambda image: PLATFORM_ARG in image.args):
        built[image.name] = build(on_platform_tag(image, tag), tag(image.name))
    return built


def on_platform_tag(image: ImageBuild, tag: Callable[[str], str]) -> ImageBuild:
    """`image`, built FROM `tag(<its platform image's name>)` if it is a model's image."""
    if PLATFORM_ARG not in image.args:
        return image
    return dataclasses.replace(image, args={**image.args, PLATFORM_ARG: tag(repository(image.args[PLATFORM_ARG]))})


def build(image: ImageBuild, tag: str, no_cache: bool = False) -> Build:
    dockerfile = image.dockerfile or image.context / "Dockerfile"
    command = ["docker", "build", "--tag", tag, "--file", str(dockerfile)]
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
