"""Figure 3: a no-op rebuild of the training and serving images against their first build, and which
layers a no-op and a code-only change rebuild."""
from __future__ import annotations

import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

from benchmarks import builds
from benchmarks.report import Figure, median, ratio, rounds_text, spread
from mlops_spec.loading import load_stage

# The source file a code-only change edits, per image: the last layer of each Dockerfile copies its folder. The
# platform's training and serving code, and a model project's own training code (its image is built FROM the
# platform's training image).
CODE_FILES = {"training": "mlops_training/runner.py", "serving": "serving/app.py",
              "iris-classifier-training": "iris_model/train.py"}


def bench_tag(image: str, variant: str) -> str:
    return f"mlops-bench/{image}:{variant}"


@dataclass(frozen=True)
class Rebuild:
    build: builds.Build
    layers_changed: int
    """Filesystem layers (diff IDs) of the new image that the image before it did not have."""


def rebuild(image: builds.ImageBuild, tag: str, before: builds.Build) -> Rebuild:
    after = builds.build(image, tag)
    changed = set(builds.image_layers(after.image_id)) - set(builds.image_layers(before.image_id))
    return Rebuild(after, len(changed))


def first_and_noop(image: builds.ImageBuild, rounds: int) -> tuple[list[builds.Build], list[Rebuild]]:
    """Alternate a build from nothing (`--no-cache`) with a rebuild of unchanged inputs, `rounds` times."""
    first, noop = [], []
    tag = bench_tag(image.name, "rebuild")
    for _ in range(rounds):
        replaced = builds.image_id(tag) if builds.image_exists(tag) else None
        first.append(builds.build(image, tag, no_cache=True))
        noop.append(rebuild(image, tag, first[-1]))
        if replaced:
            builds.remove_if_untagged(replaced)  # the previous round's copy; keeps the disk from filling up
    return first, noop


def code_change(image: builds.ImageBuild, code_file: str) -> Rebuild:
    """Rebuild after editing one source file in a copy of the context."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{image.name}-") as scratch:
        copy = builds.copied(image, Path(scratch) / image.name)
        tag = bench_tag(image.name, "code-change")
        before = builds.build(copy, tag)
        edited = copy.context / code_file
        source = edited.read_text()
        edited.unlink()
        edited.write_text(source + "\n# benchmark: a code-only change\n")
        changed = rebuild(copy, tag, before)
        builds.remove_image(tag)  # only the edited image: `before` came from the cache other tags hold
    return changed


def describe_steps(build: builds.Build) -> str:
    cached = f"{build.cached} cached"
    if not build.executed:
        return f"none ({cached})"
    shown = ", ".join(f"`{textwrap.shorten(step, width=60, placeholder=' …')}`" for step in build.executed)
    return f"{len(build.executed)} ({cached}): {shown}"


def measure(rounds: int = 3) -> Figure:
    stage_images = builds.stage_builds("bench", load_stage("dev"))
    figure = Figure(
        title="Rebuilds: no-op and code-only rebuilds against a first build",
        goal="a no-op rebuild runs no step and changes no layer; a training-code change rebuilds only the code layer.",
        headers=["image", "first build (`--no-cache`), s", "no-op rebuild, s", "no-op / first",
                 "no-op: steps run", "no-op: layers changed", "code-only change: steps run",
                 "code-only change: layers changed"],
        notes=[f"{rounds_text(rounds)} per image, alternating a `--no-cache` build with a no-op rebuild; seconds are "
               "medians (min–max) of wall time of `docker build`.",
               "Build arguments and targets are the ones `mlops plan dev` renders (serving builds target "
               f"`{stage_images['serving'].target}`).",
               "Steps run: Dockerfile instructions the builder executed rather than took from its cache "
               "(`FROM` and leading `ARG` excluded). Layers changed: filesystem layers (RootFS diff IDs) of "
               "the new image that the previous one did not have; metadata-only steps add none.",
               "Code-only change: a comment appended to "
               + " and ".join(f"`{name}/{path}`" for name, path in CODE_FILES.items())
               + " in a copy of the build context, built after a cached build of the unchanged copy. The model "
               "project's image (images/model/Dockerfile on models/iris-classifier) builds FROM the training image "
               "of the row above; its code and the packages only its lock adds are one layer.",
               "Classic builder (`DOCKER_BUILDKIT=0`): the engine has no BuildKit here (`docker buildx` missing)."],
    )
    verdicts = []
    for name, code_file in CODE_FILES.items():
        # A model's image builds FROM the platform image this figure built just before it.
        image = builds.on_platform_tag(stage_images[name], lambda platform: bench_tag(platform, "rebuild"))
        first, noop = first_and_noop(image, rounds)
        changed = code_change(image, code_file)
        first_s, noop_s = [b.seconds for b in first], [r.build.seconds for r in noop]
        noop_verdict = "rebuilt something" if any(r.build.executed or r.layers_changed for r in noop) else "ran nothing"
        code_verdict = ("rebuilt only the code layer" if changed.layers_changed == 1
                        else f"changed {changed.layers_changed} layers")
        verdicts.append(f"{name}: no-op {noop_verdict}, code-only change {code_verdict}")
        figure.rows.append([
            f"{name}" + (f" (target `{image.target}`)" if image.target else ""),
            spread(first_s), spread(noop_s), ratio(median(noop_s), median(first_s)),
            # The worst round: a step that ran in any round is a step that can run.
            describe_steps(max((r.build for r in noop), key=lambda build: len(build.executed))),
            str(max(r.layers_changed for r in noop)),
            describe_steps(changed.build), str(changed.layers_changed),
        ])
    figure.notes.insert(0, "; ".join(verdicts) + ". Steps after a changed one always run again; those that only "
                           "set metadata (`USER`, `EXPOSE`, `CMD`, `ENTRYPOINT`) add no layer.")
    return figure
