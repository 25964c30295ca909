"""`mlops promote --from SRC --to DST --model M`: copy the pins that make M's release into the target spec, or refuse.

A model's release is its version (number and sha256) and the digests of its training and serving images. Promotion
checks everything before it changes anything: the target spec file is committed, the model's `model.pkl` is in
the source registry with the pinned sha256, its metrics meet the target's gates of that model, and both images
are in the source stage's image registry under their digests (a building stage without a registry, dev on one host,
hands them over from its Docker engine, each compressed once into a local folder). Then it copies the images into the
target stage's own image registry byte for byte (same digests, verified there), copies the model into the target's model
registry (verified by downloading it back), and edits `models.M.release` of the target spec in place, keeping its
comments, key order and every other model's pins, through an atomic rename: an interrupted promote leaves the
old file or the new one, never a mix, and a pin never names anything that was not copied and verified.
Each stage is reached on its own Docker host (`mlops.reach`): prod never depends on dev being up.
"""
from __future__ import annotations

import difflib
import io
import os
import shutil
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, TypeVar

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import CommentMark
from ruamel.yaml.tokens import CommentToken

from components.images import BuildSettings, model_image_name, model_image_repository
from mlops import credentials, gitrepo, rollout
from mlops.imagecopy import (
    EngineImage,
    RegistryError,
    StageRegistry,
    copy_image,
    copy_taken,
    manifest_digest,
    take_from_engine,
)
from mlops.modelstore import ModelStore, ModelVersion, StoreError
from mlops.reach import StageReach, Unreachable
from mlops.signing import SigningError, check_files, check_signed, public_keys
from mlops_spec.contract import PROMOTER, TRUSTED_MODEL_KEYS, release_id
from mlops_spec.errors import SpecError, excerpt
from mlops_spec.loading import load_stage, stage_file
from mlops_spec.models import GreenRelease, ModelPin, ReleaseImages, StageSpec
from mlops_spec.project import ENVIRONMENTS_DIR
from mlops_spec.service_tls import client_ca

Secret = TypeVar("Secret")


class PromotionRefused(Exception):
    """Promotion would break a rule; nothing was changed."""


class ModelNotNamed(PromotionRefused):
    """`--model` was left out where the stage serves several models: the command line is incomplete."""


@dataclass(frozen=True)
class ImageCopy:
    """One promoted image: where it is in the source stage's registry and where it goes in the target's."""

    role: str
    source_repository: str
    digest: str
    target_repository: str
    target_server: str
    taken: Optional[EngineImage] = None
    """The image as taken from the source's Docker engine, where the source has no image registry."""

    @property
    def pin(self) -> str:
        return f"{self.target_server}/{self.target_repository}@{self.digest}"


@dataclass(frozen=True)
class PromotedRelease:
    """The pins written to the target spec, with the model as fetched from the source registry."""

    model: ModelVersion
    target_version: int
    images: tuple[ImageCopy, ...]

    def as_spec(self) -> dict:
        """`models.<name>.release` of the target spec."""
        return {"version": self.target_version, "sha256": self.model.sha256,
                "images": {image.role: image.pin for image in self.images}}


@dataclass(frozen=True)
class Promotion:
    source: StageSpec
    target: StageSpec
    target_file: Path
    release: PromotedRelease
    original: str
    updated: str

    def unified_diff(self) -> str:
        return spec_diff(self.target_file, self.original, self.updated)


def spec_diff(file: Path, original: str, updated: str) -> str:
    name = f"{file.parent.name}/{file.name}"
    return "".join(difflib.unified_diff(original.splitlines(keepends=True), updated.splitlines(keepends=True),
                                        fromfile=f"a/{name}", tofile=f"b/{name}"))


@dataclass(frozen=True)
class GreenPromotion:
    """A model's green, which finished its rollout, as the model's new blue: one edit of the stage's own spec file."""

    spec: StageSpec
    model: str
    green: GreenRelease
    file: Path
    original: str
    updated: str

    def unified_diff(self) -> str:
        return spec_diff(self.file, self.original, self.updated)


def _refuse_unless_committed(file: Path) -> None:
    try:
        dirty = gitrepo.has_uncommitted_changes(file)
    except SpecError as err:
        raise PromotionRefused(f"{file} must be committed to git before promoting into it ({err.message})") from None
    if dirty:
        raise PromotionRefused(f"{file} has uncommitted edits; commit or discard them first, so the promotion "
                               "is the only change in its diff")


def _secret(read: Callable[[str], Secret], key: str) -> Secret:
    """What `read(key)` reads with a stage's secret; a missing secret refuses the promotion."""
    try:
        return read(key)
    except credentials.MissingSecret as err:
        raise PromotionRefused(str(err)) from None


def _repository_of(spec: StageSpec, path: str, ref: str) -> tuple[str, str]:
    """(repository, digest) of a pin in `spec`'s own registry, e.g. `staging/serving`, `sha256:…`."""
    name, _, digest = ref.partition("@")
    server = spec.image_registry_server
    if not digest or server is None or not name.startswith(f"{server}/"):
        raise PromotionRefused(f"{spec.stage}'s {path} '{ref}' is not an image in {spec.stage}'s own registry "
                               f"({server}/...@sha256:<digest>); promote into {spec.stage} first")
    return name.removeprefix(f"{server}/"), digest


def _fetch_source_model(source: StageSpec, pin: ModelPin, store: ModelStore, wanted: int | None) -> ModelVersion:
    """The source's model: the version it pins, else (a stage following `latest`) `wanted` or the newest."""
    if wanted is not None and isinstance(pin.version, int) and wanted != pin.version:
        raise PromotionRefused(f"{source.stage} runs {pin.name} v{pin.version}, not v{wanted}: --version names the version "
                               f"{source.stage} pins, or any of a stage that follows its newest model")
    try:
        version = pin.version if isinstance(pin.version, int) else wanted or store.latest_version(pin.name)
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


def chosen_model(spec: StageSpec, model: str | None) -> str:
    """`model`, or the one model `spec` serves when `--model` was left out."""
    if model is not None:
        return model
    served = [served.name for served in spec.served_models()]
    if not served:
        raise PromotionRefused(f"{spec.stage} has no release to promote: nothing was promoted to it yet")
    if len(served) > 1:
        raise ModelNotNamed(f"{spec.stage} serves {', '.join(served)}: name the one to promote with --model")
    return served[0]


def _refuse_unless_declared(spec: StageSpec, file: Path, model: str) -> None:
    if model not in spec.models:
        raise PromotionRefused(f"{file.name} (with base.yaml) declares no model '{excerpt(model)}' under models:, only "
                               f"{', '.join(sorted(spec.models)) or 'none'}; declare it there first")


def _check_gates(model: ModelVersion, target: StageSpec) -> None:
    misses = []
    for metric, threshold in sorted(target.models[model.name].gates.min_metrics.items()):
        value = model.metrics.get(metric)
        if value is None:
            misses.append(f"{metric} is not recorded (needs >= {threshold})")
        elif value < threshold:
            misses.append(f"{metric} {value} < {threshold}")
    if misses:
        raise PromotionRefused(f"model {model.name} v{model.version} misses {target.stage}'s "
                               f"models.{model.name}.gates.min_metrics: " + "; ".join(misses))


def _yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap long lines such as image references
    yaml.indent(mapping=2, sequence=4, offset=2)
    return yaml


def _mapping(parent: CommentedMap, key: str, position: int) -> CommentedMap:
    """`parent[key]`, a new block-style mapping at `position` (or in place of a `key:` left empty) where `parent` has
    none."""
    if not isinstance(parent.get(key), CommentedMap):
        if key in parent:
            position = list(parent).index(key)
            del parent[key]
        parent.insert(min(position, len(parent)), key, CommentedMap())
        parent[key].fa.set_block_style()
    return parent[key]


def pinned_text(original: str, model: str, release: dict) -> str:
    """`original` with `release` as `models.<model>.release`, every other line as it was: existing keys keep their
    place, style and comments. A missing `models` block goes last, as in the shipped stage files; a missing model
    at the end of `models`; a missing `release` first in its model, above its gates and the like."""
    yaml = _yaml()
    document = yaml.load(original) or CommentedMap()
    if "models" not in document:
        _mapping(document, "models", len(document))
        if len(document) > 1:
            # Top-level blocks are separated by a blank line, which ruamel keeps as a comment before a key.
            document.ca.items["models"] = [None, [CommentToken("\n", CommentMark(0))], None, None]
    models = _mapping(document, "models", len(document))
    deployment = _mapping(models, model, len(models))
    if "release" not in deployment:
        # `{gates: …}` written on one line would take the whole release onto it.
        deployment.fa.set_block_style()
    _assign(_mapping(deployment, "release", 0), release)
    return _dumped(yaml, document)


def edited_text(original: str, values: dict) -> str:
    """`original` with `values` assigned, a nested dict into the mapping of its key, every other line as it was:
    existing keys keep their place, style and comments."""
    yaml = _yaml()
    document = yaml.load(original) or CommentedMap()
    _assign(document, values)
    return _dumped(yaml, document)


def green_as_blue_text(original: str, model: str) -> str:
    """`original` with `models.<model>.green`'s pins as that model's release and no green slot or traffic split
    left: blue takes all of the model's traffic again, now serving what green served."""
    yaml = _yaml()
    document = yaml.load(original)
    deployment = document["models"][model]
    green = deployment.pop("green")
    deployment.pop("traffic", None)
    release = deployment["release"]
    for key in ("version", "sha256"):
        if key in green:
            release[key] = green[key]
        else:  # a dev green that follows `latest`: blue's sha256 would refuse green's bytes
            release.pop(key, None)
    if "serving_image" in green:
        _assign(release, {"images": {"serving": green["serving_image"]}})
    return _dumped(yaml, document)


def _dumped(yaml: YAML, document: CommentedMap) -> str:
    written = io.StringIO()
    yaml.dump(document, written)
    return written.getvalue()


def prepare_green_promotion(stage: str, model: str | None, environments: Path,
                            rollout_state: Callable[[StageSpec, str], dict | None]) -> GreenPromotion:
    """Every check, and `stage`'s spec text with `model`'s green as its new blue; changes nothing. The green must
    have finished its rollout: `rollout_state(spec, model)` answers what the stage's gateway recorded."""
    file = stage_file(stage, environments)
    spec = load_stage(stage, environments)
    model = chosen_model(spec, model)
    _refuse_unless_declared(spec, file, model)
    green = spec.models[model].green
    original = file.read_text()
    own = ((_yaml().load(original) or CommentedMap()).get("models") or {}).get(model) or {}
    if green is None or "green" not in own or "release" not in own:
        raise PromotionRefused(f"{file.name} declares no models.{model}.green and models.{model}.release of its own "
                               "to swap")
    if green.rollout is not None:
        state = rollout_state(spec, model)
        release = release_id(green.of(model))
        if state is None or state.get("green_release") != release or state.get("phase") != rollout.FINISHED:
            seen = "no rollout state" if state is None else f"rollout of {state.get('green_release')} is {state.get('phase')}"
            raise PromotionRefused(f"{stage}'s green {release} has not finished its rollout ({seen}); promote it "
                                   "once the gateway has moved all traffic to it")
    _refuse_unless_committed(file)
    updated = green_as_blue_text(original, model)
    validate_updated(spec, file, updated)
    return GreenPromotion(spec=spec, model=model, green=green, file=file, original=original, updated=updated)


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


class Promoter:
    """Promotes between the stages of one `environments/` folder, reaching each stage on its own Docker host.
    Use as a context manager: SSH tunnels to remote stages close on exit."""

    def __init__(self, environments: Path = ENVIRONMENTS_DIR,
                 password_for: Callable[[str], str] = credentials.registry_password,
                 trusted_keys_for: Callable[[str], str] = credentials.trusted_model_keys) -> None:
        """`password_for(stage)` is the stage's image registry password, `trusted_keys_for(stage)` the public
        keys whose model signatures the stage's replicas accept. Each stage's MLflow is reached as `promoter`: it
        reads the source stage and writes into the target."""
        self.environments = environments
        self.password_for = password_for
        self.trusted_keys_for = trusted_keys_for
        self._exits = ExitStack()
        self._reaches: dict[str, StageReach] = {}
        self._scratch: Optional[str] = None

    def __enter__(self) -> "Promoter":
        return self

    def __exit__(self, *_exc) -> None:
        self._exits.close()

    def _reach(self, spec: StageSpec) -> StageReach:
        if spec.stage not in self._reaches:
            self._reaches[spec.stage] = self._exits.enter_context(StageReach(spec))
        return self._reaches[spec.stage]

    def model_store(self, spec: StageSpec) -> ModelStore:
        return _secret(self._reach(spec).model_store, PROMOTER)

    def _check_signed_for(self, target: StageSpec, model: ModelVersion) -> None:
        """Refuse a version the target's replicas would refuse: its files must be what its tags say, and a key the
        target trusts must have signed those tags. The signature is copied with the tags."""
        where = f"{target.stage}'s mlops:{TRUSTED_MODEL_KEYS}"
        try:
            trusted = public_keys(_secret(self.trusted_keys_for, target.stage), where)
            check_files(model)
            check_signed(model.name, model.version, model.tags, trusted, where)
        except SigningError as err:
            raise PromotionRefused(f"refusing to promote {model.name} v{model.version} into {target.stage}: "
                                   f"{err}") from None

    def image_registry(self, spec: StageSpec) -> StageRegistry:
        reach = self._reach(spec)
        address = reach.image_registry_address()
        if address is None:
            raise PromotionRefused(f"{spec.stage} has no image registry (image_registry.enabled is false); "
                                   "promotion copies images into the target's own registry")
        password = _secret(self.password_for, spec.stage)
        return StageRegistry(where=reach.where("image registry"), address=address,
                             username=spec.image_registry.username, password=password,
                             ca_certificate=client_ca(spec.image_registry.port, password, spec.stage, "image-registry"))

    def _taken_folder(self, name: str) -> str:
        """A folder for an image taken from an engine, inside one private folder removed when the promoter closes."""
        if self._scratch is None:
            self._scratch = self._exits.enter_context(tempfile.TemporaryDirectory(prefix="mlops-promote-"))
        return os.path.join(self._scratch, name)

    def _source_images(self, source: StageSpec, promoted: ReleaseImages, model: str,
                       target: StageSpec) -> tuple[ImageCopy, ...]:
        """Each image of the source's release (`promoted`) of `model`, with its digest as the source registry serves
        it (or as taken from a building stage's engine where it has no registry), and the repository it goes to in
        the target's: `<target>/<model>-<role>`, as a building stage names it."""
        registry = self.image_registry(source) if source.image_registry.enabled else None
        # Only building stages (dev, experiments) have no server to pin under, and none is promoted into.
        assert target.image_registry_server is not None, target.stage
        built = {"training": (source.training.build, None), "serving": (source.serving.build, source.serving.runtime)}
        copies = []
        for role in ("training", "serving"):
            ref = getattr(promoted, role)
            taken = None
            if ref is not None:
                # The stage rules give every stage that pins images a registry to pin them in.
                assert registry is not None, source.stage
                repository, digest = _repository_of(source, f"models.{model}.release.images.{role}", ref)
                manifest_digest(registry, repository, digest)
            else:  # a building stage (dev) promotes its model's images as built, found by the content tag
                context, build_target = built[role]
                # The stage rules pin promoted stages' images by digest, so a source without one builds them.
                assert context is not None, (source.stage, role)
                settings = BuildSettings.of(source)
                repository, tag = model_image_repository(source.stage, role, context, settings, model, build_target)
                wanted = (f"{repository}:{tag}" if registry else
                          model_image_name(source.stage, role, context, settings, model, target=build_target))
                try:
                    if registry is None:
                        taken = take_from_engine(wanted, f"{source.stage}'s Docker engine ({source.docker.url})",
                                                 source.docker.cli_environment(), self._taken_folder(role))
                        repository, digest = taken.name, taken.digest
                    else:
                        digest = manifest_digest(registry, repository, tag)
                except RegistryError as err:
                    where = "image registry" if registry else "Docker engine"
                    raise PromotionRefused(f"{source.stage} has no built {role} image {wanted} (the {role} build "
                                           f"context as it is now): {err}; run `pulumi up -s {source.stage}` so it is "
                                           f"built into {source.stage}'s {where}") from None
            copies.append(ImageCopy(role=role, source_repository=repository, digest=digest,
                                    target_repository=f"{target.stage}/{model}-{role}",
                                    target_server=target.image_registry_server, taken=taken))
        return tuple(copies)

    def prepare(self, source_stage: str, target_stage: str, model: str | None = None,
                version: int | None = None) -> Promotion:
        """Every check, and the updated target spec text; changes nothing anywhere. `model`: the model whose release
        is promoted, None for the one the source serves. `version`: exactly this version of it, not whatever is
        newest when a stage that follows `latest` is promoted."""
        if source_stage == target_stage:
            raise PromotionRefused(f"--from and --to are both {source_stage}; promote from one stage to another, "
                                   "or its finished green to blue with --green")
        target_file = stage_file(target_stage, self.environments)
        source = load_stage(source_stage, self.environments)
        target = load_stage(target_stage, self.environments)
        if target.builds_workloads:
            raise PromotionRefused(f"{target_stage} builds its own images and follows its newest model; "
                                   "promote into a staging or prod stage")
        if target.promote_from != source_stage:
            raise PromotionRefused(f"{target_stage} is promoted from {target.promote_from} "
                                   f"({target_file.name}: promote_from), not from {source_stage}")
        name = chosen_model(source, model)
        _refuse_unless_declared(target, target_file, name)
        promoted = source.models[name].release if name in source.models else None
        if promoted is None:
            raise PromotionRefused(f"{source_stage} has no release of {name} to promote: it does not serve that model")
        _refuse_unless_committed(target_file)
        try:
            fetched = _fetch_source_model(source, promoted.of(name), self.model_store(source), version)
            self._check_signed_for(target, fetched)
            _check_gates(fetched, target)
            # The target's address and password first: taking images from a source's engine compresses them.
            self.image_registry(target)
            images = self._source_images(source, promoted.images, name, target)
            target_store = self.model_store(target)
            try:
                version = target_store.find_version(name, fetched.sha256) or target_store.next_version(name)
            except StoreError as err:
                raise PromotionRefused(f"cannot reach {self._reach(target).where('model registry')}: {err}") from None
        except (Unreachable, RegistryError) as err:
            raise PromotionRefused(str(err)) from None
        release = PromotedRelease(model=fetched, target_version=version, images=images)
        original = target_file.read_text()
        updated = pinned_text(original, name, release.as_spec())
        validate_updated(target, target_file, updated)
        return Promotion(source=source, target=target, target_file=target_file, release=release,
                         original=original, updated=updated)

    def apply(self, promotion: Promotion) -> Promotion:
        """Copy the images, then the model, verifying each in the target; only then write the target spec."""
        unchanged = f"{promotion.target_file.name} is unchanged"
        try:
            target_registry = self.image_registry(promotion.target)
            from_registry = any(image.taken is None for image in promotion.release.images)
            source_registry = self.image_registry(promotion.source) if from_registry else None
            for image in promotion.release.images:
                if image.taken is not None:
                    copy_taken(image.taken, target_registry, image.target_repository)
                else:
                    assert source_registry is not None
                    copy_image(source_registry, image.source_repository, image.digest,
                               target_registry, image.target_repository)
            store = self.model_store(promotion.target)
        except (Unreachable, RegistryError) as err:
            raise PromotionRefused(f"{err}; {unchanged}") from None
        model = promotion.release.model
        try:
            version = store.find_version(model.name, model.sha256) or store.publish(
                model, {"mlops.promoted_from": f"{promotion.source.stage} v{model.version}"})
            copied = store.fetch(model.name, version)
        except StoreError as err:
            raise PromotionRefused(f"copying the model into {self._reach(promotion.target).where('model registry')} "
                                   f"failed: {err}; {unchanged}") from None
        if copied.sha256 != model.sha256:
            raise PromotionRefused(f"model {model.name} v{version} in {store.url} has sha256 {copied.sha256} after "
                                   f"copying, expected {model.sha256}; {unchanged}")
        if version != promotion.release.target_version:
            # Someone registered a version meanwhile: pin the one this promote created.
            release = replace(promotion.release, target_version=version)
            updated = pinned_text(promotion.original, model.name, release.as_spec())
            validate_updated(promotion.target, promotion.target_file, updated)
            promotion = replace(promotion, release=release, updated=updated)
        if promotion.target_file.read_text() != promotion.original:
            raise PromotionRefused(f"{promotion.target_file} changed while promoting; nothing written, run promote again")
        write_atomically(promotion.target_file, promotion.updated)
        return promotion
