"""`mlops promote --from SRC --to DST`: copy the pins that make a release into the target spec, or refuse.

A release is the model (name, version, sha256) and the training and serving image digests. Promotion
checks everything before it changes anything: the target spec file is committed, the model's
`model.pkl` is in the source registry with the pinned sha256, and its metrics meet the target's gates.
Then it copies the model into the target stage's registry (verified by downloading it back) and edits
the target spec in place, keeping its comments and key order, through an atomic rename: an interrupted
promote leaves the old file or the new one, never a mix.
"""
from __future__ import annotations

import difflib
import io
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import CommentMark
from ruamel.yaml.tokens import CommentToken

from components.images import content_tag
from mlops import gitrepo
from mlops.errors import SpecError
from mlops.modelstore import MlflowStore, ModelStore, ModelVersion, StoreError
from mlops.spec import ENVIRONMENTS_DIR, StageSpec, load_stage, stage_file

StoreFactory = Callable[[str], ModelStore]


class PromotionRefused(Exception):
    """Promotion would break a rule; nothing was changed."""


@dataclass(frozen=True)
class PromotedRelease:
    """The pins written to the target spec, with the model as fetched from the source registry."""

    model: ModelVersion
    target_version: int
    training_image: str
    serving_image: str

    def as_spec(self) -> dict:
        return {"model": {"name": self.model.name, "version": self.target_version, "sha256": self.model.sha256},
                "images": {"training": self.training_image, "serving": self.serving_image}}


@dataclass(frozen=True)
class Promotion:
    source: StageSpec
    target: StageSpec
    target_file: Path
    release: PromotedRelease
    original: str
    updated: str

    def unified_diff(self) -> str:
        name = f"{self.target_file.parent.name}/{self.target_file.name}"
        return "".join(difflib.unified_diff(self.original.splitlines(keepends=True), self.updated.splitlines(keepends=True),
                                            fromfile=f"a/{name}", tofile=f"b/{name}"))


def registry_url(spec: StageSpec) -> str:
    return f"http://127.0.0.1:{spec.model_registry.port.host_port}"


def _refuse_unless_committed(file: Path) -> None:
    try:
        dirty = gitrepo.has_uncommitted_changes(file)
    except SpecError as err:
        raise PromotionRefused(f"{file} must be committed to git before promoting into it ({err.message})") from None
    if dirty:
        raise PromotionRefused(f"{file} has uncommitted edits; commit or discard them first, so the promotion "
                               "is the only change in its diff")


def built_image_digest(spec: StageSpec, role: str, context: str, target: Optional[str]) -> str:
    """The registry digest of the image a building stage (dev) built for `role`, from its Docker engine."""
    tag = content_tag(context, {"BASE_IMAGE": spec.training.base_image}, target)
    # Named as components.images.build_image names it.
    server = f"localhost:{spec.image_registry.port.host_port}" if spec.image_registry.enabled else f"mlops-{spec.stage}"
    repository = f"{server}/{spec.stage}/{role}"
    missing = (f"{spec.stage} has no pushed {role} image {repository}:{tag} (the {role} build context as it is now); "
               f"run `pulumi up -s {spec.stage}` so it is built and pushed to {spec.stage}'s image registry")
    try:
        inspected = subprocess.run(["docker", "image", "inspect", "--format", "{{json .RepoDigests}}", f"{repository}:{tag}"],
                                   capture_output=True, text=True, env={**os.environ, "DOCKER_HOST": spec.docker.url})
    except FileNotFoundError:
        raise PromotionRefused(f"{missing}: the docker command is not installed") from None
    if inspected.returncode != 0:
        raise PromotionRefused(f"{missing}: {inspected.stderr.strip() or 'docker image inspect failed'}")
    digests = [ref for ref in json.loads(inspected.stdout or "[]") or [] if ref.startswith(f"{repository}@sha256:")]
    if not digests:
        raise PromotionRefused(f"{missing}: the image exists but was never pushed (it has no registry digest)")
    return digests[0]


def _source_images(source: StageSpec) -> tuple[str, str]:
    pinned = source.release.images
    if not source.builds_workloads:
        return pinned.training, pinned.serving  # both set: the spec invariants require them outside dev
    return (pinned.training or built_image_digest(source, "training", source.training.build, None),
            pinned.serving or built_image_digest(source, "serving", source.serving.build, source.serving.runtime))


def _fetch_source_model(source: StageSpec, store: ModelStore) -> ModelVersion:
    pin = source.release.model
    try:
        version = pin.version if isinstance(pin.version, int) else store.latest_version(pin.name)
        model = store.fetch(pin.name, version)
    except StoreError as err:
        raise PromotionRefused(f"cannot fetch the model {source.stage} pins: {err}") from None
    tagged = model.tags.get("sha256")
    for claim, claimed in ((f"{source.stage}'s pin", pin.sha256), ("the registry's sha256 tag", tagged)):
        if claimed is not None and claimed != model.sha256:
            raise PromotionRefused(f"model {pin.name} v{version}: model.pkl in {store.url} has sha256 {model.sha256}, "
                                   f"but {claim} says {claimed}; the artifact changed since it was registered")
    if pin.sha256 is None and tagged is None:
        raise PromotionRefused(f"model {pin.name} v{version} carries no sha256 tag in {store.url}; "
                               "only versions registered by `mlops train` (tagged sha256) can be promoted")
    return model


def _check_gates(model: ModelVersion, target: StageSpec) -> None:
    misses = []
    for metric, threshold in sorted(target.gates.min_metrics.items()):
        value = model.metrics.get(metric)
        if value is None:
            misses.append(f"{metric} is not recorded (needs >= {threshold})")
        elif value < threshold:
            misses.append(f"{metric} {value} < {threshold}")
    if misses:
        raise PromotionRefused(f"model {model.name} v{model.version} misses {target.stage}'s gates.min_metrics: "
                               + "; ".join(misses))


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap long lines such as image references
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


def pinned_text(original: str, release: dict) -> str:
    """`original` with `release` pinned: existing keys keep their place and comments; a new `release`
    block goes after `serving`, where dev.yaml declares it."""
    yaml = _yaml()
    document = yaml.load(original) or CommentedMap()
    if "release" not in document:
        position = list(document).index("serving") + 1 if "serving" in document else len(document)
        document.insert(position, "release", CommentedMap())
        # Top-level blocks are separated by a blank line, which ruamel keeps as a comment before a key.
        document.ca.items["release"] = [None, [CommentToken("\n", CommentMark(0))], None, None]
    _assign(document["release"], release)
    written = io.StringIO()
    yaml.dump(document, written)
    return written.getvalue()


def _assign(mapping: CommentedMap, values: dict) -> None:
    for key, value in values.items():
        if isinstance(value, dict):
            if not isinstance(mapping.get(key), dict):
                mapping[key] = CommentedMap()
            _assign(mapping[key], value)
        else:
            mapping[key] = value


def validate_updated(target: StageSpec, target_file: Path, updated: str) -> None:
    """Load the updated spec from a scratch copy first: a promote never writes a spec that does not load."""
    with tempfile.TemporaryDirectory(prefix="mlops-promote-") as scratch:
        shutil.copy2(target_file.parent / "base.yaml", Path(scratch) / "base.yaml")
        (Path(scratch) / target_file.name).write_text(updated)
        try:
            load_stage(target.stage, environments=Path(scratch))
        except SpecError as err:
            raise PromotionRefused(f"the promoted {target_file.name} would not validate: "
                                   f"{err.field or 'spec'}: {err.message}; nothing written") from None


def write_atomically(file: Path, text: str) -> None:
    """Replace `file` by `text` through a synced temporary file in the same folder and one rename."""
    descriptor, temporary = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, file.stat().st_mode & 0o7777)
        os.replace(temporary, file)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    # The rename itself is durable only once the folder is synced.
    folder = os.open(file.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def prepare(source_stage: str, target_stage: str, environments: Path = ENVIRONMENTS_DIR,
            store_for: StoreFactory = MlflowStore) -> Promotion:
    """Every check, and the updated target spec text; changes nothing anywhere."""
    if source_stage == target_stage:
        raise PromotionRefused(f"--from and --to are both {source_stage}; promote from one stage to another")
    target_file = stage_file(target_stage, environments)
    source = load_stage(source_stage, environments)
    target = load_stage(target_stage, environments)
    if target.builds_workloads:
        raise PromotionRefused(f"{target_stage} builds its own images and follows its newest model; "
                               "promote into staging or prod")
    if source.release is None:
        raise PromotionRefused(f"{source_stage} has no release to promote: nothing was promoted to it yet")
    _refuse_unless_committed(target_file)

    model = _fetch_source_model(source, store_for(registry_url(source)))
    _check_gates(model, target)
    training_image, serving_image = _source_images(source)
    target_store = store_for(registry_url(target))
    try:
        version = target_store.find_version(model.name, model.sha256) or target_store.next_version(model.name)
    except StoreError as err:
        raise PromotionRefused(f"cannot reach {target_stage}'s model registry: {err}") from None
    release = PromotedRelease(model=model, target_version=version, training_image=training_image, serving_image=serving_image)
    original = target_file.read_text()
    updated = pinned_text(original, release.as_spec())
    validate_updated(target, target_file, updated)
    return Promotion(source=source, target=target, target_file=target_file, release=release,
                     original=original, updated=updated)


def apply(promotion: Promotion, store_for: StoreFactory = MlflowStore) -> Promotion:
    """Copy the model into the target registry, verify it there, then write the target spec atomically."""
    model = promotion.release.model
    store = store_for(registry_url(promotion.target))
    try:
        version = store.find_version(model.name, model.sha256) or store.publish(
            model, {"mlops.promoted_from": f"{promotion.source.stage} v{model.version}"})
        copied = store.fetch(model.name, version)
    except StoreError as err:
        raise PromotionRefused(f"copying the model into {promotion.target.stage}'s registry failed: {err}; "
                               f"{promotion.target_file.name} is unchanged") from None
    if copied.sha256 != model.sha256:
        raise PromotionRefused(f"model {model.name} v{version} in {store.url} has sha256 {copied.sha256} after copying, "
                               f"expected {model.sha256}; {promotion.target_file.name} is unchanged")
    if version != promotion.release.target_version:
        # Someone registered a version meanwhile: pin the one this promote created.
        release = replace(promotion.release, target_version=version)
        updated = pinned_text(promotion.original, release.as_spec())
        validate_updated(promotion.target, promotion.target_file, updated)
        promotion = replace(promotion, release=release, updated=updated)
    if promotion.target_file.read_text() != promotion.original:
        raise PromotionRefused(f"{promotion.target_file} changed while promoting; nothing written, run promote again")
    write_atomically(promotion.target_file, promotion.updated)
    return promotion
