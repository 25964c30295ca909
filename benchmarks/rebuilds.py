"""Figure 3: a no-op rebuild of the training and serving images against their first build, and which
layers a no-op and a code-only change rebuild."""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import textwrap
from pathlib import Path

from benchmarks import builds
from benchmarks.report import Figure, median, ratio, spread
from mlops.spec import StageSpec

# The source file a code-only change edits, per image: the last layer of each Dockerfile copies its folder.
CODE_FILES = {"training": "mlops_training/train.py", "serving": "serving/app.py"}


def bench_tag(image: str, variant: str) -> str:
    return f"mlops-bench/{image}:{variant}"


def first_and_noop(image: builds.ImageBuild, rounds: int) -> tuple[list[builds.Build], list[builds.Build]]:
    """Alternate a build from nothing (`--no-cache`) with a rebuild of unchanged inputs, `rounds` times."""
    first, noop = [], []
    tag = bench_tag(image.name, "rebuild")
    for _ in range(rounds):
        replaced = builds.image_id(tag) if builds.image_exists(tag) else None
        first.append(builds.build(image, tag, no_cache=True))
        if replaced and replaced != first[-1].image_id:
            builds.remove_image(replaced)  # the previous round's copy; keeps the disk from filling up
        noop.append(builds.build(image, tag))
    return first, noop


def code_change(image: builds.ImageBuild, code_file: str) -> tuple[builds.Build, int]:
    """Rebuild after editing one source file in a copy of the context: (the build, layers it changed)."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{image.name}-") as scratch:
        copy = dataclasses.replace(image, context=Path(scratch) / image.name)
        # Hard links: the wheels are large and never edited; the one edited file is replaced, not written through.
        shutil.copytree(image.context, copy.context, copy_function=os.link)
        tag = bench_tag(image.name, "code-change")
        before = builds.build(copy, tag)
        edited = copy.context / code_file
        source = edited.read_text()
        edited.unlink()
        edited.write_text(source + "\n# benchmark: a code-only change\n")
        after = builds.build(copy, tag)
        changed = len(set(builds.image_layers(after.image_id)) - set(builds.image_layers(before.image_id)))
        builds.remove_image(tag)
        builds.remove_image(before.image_id)
    return after, changed


def describe_steps(executed: list[str]) -> str:
    if not executed:
        return "none"
    return f"{len(executed)}: " + ", ".join(f"`{textwrap.shorten(step, width=60, placeholder=' …')}`" for step in executed)


def measure(spec: StageSpec, rounds: int = 2) -> Figure:
    stage_images = builds.stage_builds("bench", spec)
    figure = Figure(
        title="Rebuilds: no-op and code-only rebuilds against a first build",
        goal="a no-op rebuild runs no step and changes no layer; a training-code change rebuilds only the code layer.",
        headers=["image", "first build (`--no-cache`), s", "no-op rebuild, s", "no-op / first",
                 "no-op: steps run", "no-op: layers changed", "code-only change: steps run",
                 "code-only change: layers changed"],
        notes=[f"{rounds} rounds per image, alternating a `--no-cache` build with a no-op rebuild; seconds are "
               "medians (min–max) of wall time of `docker build`.",
               "Build arguments and targets are the ones `mlops plan dev` renders (serving builds target "
               f"`{stage_images['serving'].target}`).",
               "Steps run: Dockerfile instructions the builder executed rather than took from its cache "
               "(`FROM` and leading `ARG` excluded). Layers changed: filesystem layers (RootFS diff IDs) of "
               "the new image that the previous one did not have; metadata-only steps add none.",
               "Code-only change: a comment appended to "
               + " and ".join(f"`{name}/{path}`" for name, path in CODE_FILES.items())
               + " in a copy of the build context, built after a cached build of the unchanged copy.",
               "Classic builder (`DOCKER_BUILDKIT=0`): the engine has no BuildKit here (`docker buildx` missing)."],
    )
    for name, code_file in CODE_FILES.items():
        image = stage_images[name]
        first, noop = first_and_noop(image, rounds)
        changed_build, changed_layers = code_change(image, code_file)
        noop_layers = max(len(set(builds.image_layers(b.image_id)) - set(builds.image_layers(f.image_id)))
                          for f, b in zip(first, noop))
        first_s, noop_s = [b.seconds for b in first], [b.seconds for b in noop]
        figure.rows.append([
            f"{name}" + (f" (target `{image.target}`)" if image.target else ""),
            spread(first_s), spread(noop_s), ratio(median(noop_s), median(first_s)),
            describe_steps(max((b.executed for b in noop), key=len)), str(noop_layers),
            describe_steps(changed_build.executed), str(changed_layers),
        ])
    return figure
