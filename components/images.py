"""Images built from this repo, tagged by a hash of everything that goes into them.

The tag changes exactly when an input changes, so an unchanged context never rebuilds and containers
that run the image's ID are replaced exactly when the image is. The provider decides whether to rebuild
from its own hash of the build context (pulumi-docker v5.1.0 provider/provider.go `hashContext`: every file
`.dockerignore` lets through, by name, content and `fs.FileMode.String()`); the content tag hashes the same
files, and the platform is always explicit so a laptop of another architecture builds the image the stage's
host runs.

Both hashes are independent of the machine. A clone's permission bits follow its umask (git stores only
the executable bit), so the content tag hashes each file's mode as a clone under umask 022 has it (0644, or
0755 when executable: the tags of such clones stay what they were), and `normalise_modes` gives every file
of a context that mode, and every folder 0755, before the provider hashes it: `hashContext` writes the mode
string of each file into its digest, and the build copies the modes into the image. The base image is a build input by identity: a base named by a
mutable tag (`mlops-base:bookworm`) is resolved to its ID on the engine that builds
(components/engine_facts.py), passed as the build argument BASE_IMAGE_ID (no Dockerfile reads it: it is
there for the provider's diff of `build.args` and the content tag), so a rebuilt base rebuilds every image.

A model's image is a platform image with the model project on top: images/model/Dockerfile, built with the
project folder `models/<name>` as context and the platform image's content-tagged name as PLATFORM_IMAGE. The
provider hashes a Dockerfile outside the context too (by its content, under the name `Dockerfile`, with mode 0),
and so does the content tag; with the platform image's name among the build arguments, a model's tag changes
exactly when its project or its platform image's inputs do.
"""
from __future__ import annotations

import hashlib
import re
import stat
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

import pulumi
import pulumi_docker as docker

from components.engine_facts import engine_of
from mlops_spec.models import ImageSource, StageSpec
from mlops_spec.project import MODELS_FOLDER, project_root

MODEL_DOCKERFILE = "images/model/Dockerfile"


@dataclass(frozen=True)
class BuildSettings:
    """What every image a stage builds starts FROM, and the platform of the host that runs it."""

    base_image: str
    platform: str
    base_image_id: str = ""
    """The ID of `base_image` on the engine that builds, when that is a mutable tag the engine has."""

    @classmethod
    def of(cls, spec: StageSpec) -> "BuildSettings":
        base_image = spec.training.base_image
        # A digest already names the content; a tag names whatever the engine last built or pulled under it.
        pinned = "@sha256:" in base_image
        return cls(base_image=base_image, platform=spec.docker.platform,
                   base_image_id="" if pinned else engine_of(spec).image_id(base_image))

    @property
    def build_args(self) -> dict[str, str]:
        return {"BASE_IMAGE": self.base_image, **({"BASE_IMAGE_ID": self.base_image_id} if self.base_image_id else {})}


@lru_cache(maxsize=None)
def _ignore_rules(dockerignore: Path) -> tuple[tuple[re.Pattern, bool], ...]:
    """`.dockerignore` patterns as (regex, excludes) in file order; the last matching rule wins, as in
    Docker's patternmatcher. `**` spans directories, `*` and `?` stay within one path segment."""
    rules = []
    for line in dockerignore.read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        excludes = not pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = ""
        for part in re.split(r"(\*\*/|\*\*|\*|\?)", pattern):
            regex += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        rules.append((re.compile(f"^{regex}$"), excludes))
    return tuple(rules)


def _ignored(relative: str, rules: tuple[tuple[re.Pattern, bool], ...]) -> bool:
    """A path is left out when it, or a folder above it, matches a rule."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[:depth]) for depth in range(1, len(parts) + 1)]
    ignored = False
    for regex, excludes in rules:
        if any(regex.match(prefix) for prefix in prefixes):
            ignored = excludes
    return ignored


def context_files(context: Path) -> list[Path]:
    """The files of a build context that reach the build, as `.dockerignore` selects them."""
    dockerignore = context / ".dockerignore"
    rules = _ignore_rules(dockerignore) if dockerignore.is_file() else ()
    return sorted(path for path in context.rglob("*")
                  if path.is_file() and not _ignored(path.relative_to(context).as_posix(), rules))


def _normalised_mode(path: Path) -> int:
    """The mode git gives a file under umask 022: 0755 or 0644, by the one permission bit it records (its index
    keeps 100755 or 100644, by the owner's execute bit)."""
    return 0o755 if path.stat().st_mode & stat.S_IXUSR else 0o644


def normalise_modes(context: Path) -> None:
    """Give the files of `context` that reach the build, and the folders holding them, the modes a clone under
    umask 022 has: 0755 for folders and executables, 0644 for the rest. Symbolic links keep theirs (the
    provider hashes a link's target path, not its mode bits)."""
    folders = {context}
    for path in context_files(context):
        folders.update(parent for parent in path.parents if parent.is_relative_to(context))
        if not path.is_symlink():
            _chmod(path, _normalised_mode(path))
    for folder in folders:
        if not folder.is_symlink():
            _chmod(folder, 0o755)


def _chmod(path: Path, mode: int) -> None:
    if stat.S_IMODE(path.stat().st_mode) != mode:
        path.chmod(mode)


@dataclass(frozen=True)
class ModelLayer:
    """What makes a platform image a model's: that model's project, on top of the platform image named here."""

    model: str
    platform_image: str

    @property
    def context(self) -> str:
        return f"{MODELS_FOLDER}/{self.model}"

    @property
    def build_args(self) -> dict[str, str]:
        return {"PLATFORM_IMAGE": self.platform_image, "MODEL_NAME": self.model}


def _dockerfile(context: str, layer: Optional[ModelLayer]) -> str:
    return MODEL_DOCKERFILE if layer is not None else f"{context}/Dockerfile"


def _build_args(settings: BuildSettings, layer: Optional[ModelLayer]) -> dict[str, str]:
    return layer.build_args if layer is not None else settings.build_args


def content_tag(context: str, settings: BuildSettings, target: Optional[str] = None,
                layer: Optional[ModelLayer] = None) -> str:
    root = project_root() / context
    digest = hashlib.sha256()
    for key, value in sorted({**_build_args(settings, layer), "target": target or "",
                              "platform": settings.platform}.items()):
        digest.update(f"{key}={value}\n".encode())
    if layer is not None:
        digest.update(b"Dockerfile\0" + hashlib.sha256((project_root() / MODEL_DOCKERFILE).read_bytes()).digest())
    for path in context_files(root):
        digest.update(f"{path.relative_to(root).as_posix()}\0{_normalised_mode(path):o}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class PushTarget:
    server: pulumi.Input[str]
    username: str
    password: pulumi.Input[str]


def image_repository(stack: str, image: str, context: str, settings: BuildSettings, target: Optional[str] = None,
                     layer: Optional[ModelLayer] = None) -> tuple[str, str]:
    """Where `build_image` pushes `context`'s image in the stage's registry: `<stack>/<image>`, and its content tag."""
    return f"{stack}/{image}", content_tag(context, settings, target, layer)


def built_image_name(stack: str, image: str, context: str, settings: BuildSettings,
                     registry_server: Optional[str] = None, target: Optional[str] = None,
                     layer: Optional[ModelLayer] = None) -> str:
    """The name `build_image` gives `context`'s image: `<registry server>/<stack>/<image>:<content hash>` when
    pushed, else `mlops-<stack>/<image>:<content hash>`. `mlops train` finds the image the stack built by it."""
    repository, tag = image_repository(stack, image, context, settings, target, layer)
    return f"{registry_server}/{repository}:{tag}" if registry_server else f"mlops-{repository}:{tag}"


def model_layer(stack: str, image: str, context: str, settings: BuildSettings, model: str,
                target: Optional[str] = None) -> ModelLayer:
    """Model `model`'s layer on the platform image `image` built locally from `context`."""
    return ModelLayer(model=model, platform_image=built_image_name(stack, image, context, settings, target=target))


def model_image_name(stack: str, image: str, context: str, settings: BuildSettings, model: str,
                     registry_server: Optional[str] = None, target: Optional[str] = None) -> str:
    """The name `build_image` gives model `model`'s image on the platform image `image` (`<model>-<image>`)."""
    layer = model_layer(stack, image, context, settings, model, target)
    return built_image_name(stack, f"{model}-{image}", layer.context, settings, registry_server, layer=layer)


def model_image_repository(stack: str, image: str, context: str, settings: BuildSettings, model: str,
                           target: Optional[str] = None) -> tuple[str, str]:
    """Where a building stage pushes model `model`'s image on the platform image `image`, and its content tag:
    what `mlops promote` copies from it."""
    layer = model_layer(stack, image, context, settings, model, target)
    return image_repository(stack, f"{model}-{image}", layer.context, settings, layer=layer)


@dataclass(frozen=True)
class BuiltImage:
    image_id: pulumi.Output[str]
    """What the stage's containers run: the locally built image's ID."""
    image_name: pulumi.Output[str]
    """The name it goes by: in the stage's registry when pushed."""
    repo_digest: pulumi.Output[str]
    """`<registry>/<stack>/<image>@sha256:…` once pushed (what promotion copies), else the image ID."""
    push: Optional[docker.Image] = None
    """The resource that pushes it, when it is pushed."""


def _image(resource_name: str, *, parent: pulumi.Resource, image_name: pulumi.Input[str], context: str,
           settings: BuildSettings, target: Optional[str], push: Optional[PushTarget],
           depends_on: Optional[list[pulumi.Resource]] = None, layer: Optional[ModelLayer] = None) -> docker.Image:
    normalise_modes(project_root() / context)
    return docker.Image(
        resource_name,
        image_name=image_name,
        # Relative to the project folder, where Pulumi runs the program: renderings match on every clone.
        build=docker.DockerBuildArgs(context=context, dockerfile=_dockerfile(context, layer),
                                     args=_build_args(settings, layer), target=target, platform=settings.platform,
                                     builder_version=docker.BuilderVersion.BUILDER_BUILD_KIT),
        skip_push=push is None,
        registry=docker.RegistryArgs(server=push.server, username=push.username, password=push.password) if push else None,
        opts=pulumi.ResourceOptions(parent=parent, depends_on=depends_on),
    )


@dataclass(frozen=True)
class ModelImage:
    """Which model's image to build, and where the platform images it stands on are built once for the stage."""

    name: str
    platforms: "PlatformImages"


PlatformKey = tuple[str, str, Optional[str]]
"""A platform image: its image name, context and target."""


@dataclass
class PlatformImages:
    """The platform images of a stage's model images: each built once, by the stack component (`owner`), however
    many models stand on it; and the last push of a model image on each, which the next one on it waits for."""

    owner: pulumi.Resource
    built: dict[PlatformKey, docker.Image] = field(default_factory=dict)
    last_push: dict[PlatformKey, docker.Image] = field(default_factory=dict)

    def build(self, stack: str, image: str, context: str, settings: BuildSettings, target: Optional[str],
              layer: ModelLayer) -> docker.Image:
        key = (image, context, target)
        if key not in self.built:
            self.built[key] = _image(f"{stack}-{image}{f'-{target}' if target else ''}-platform", parent=self.owner,
                                     image_name=layer.platform_image, context=context, settings=settings,
                                     target=target, push=None)
        return self.built[key]

    def pushed_after(self, image: str, context: str, target: Optional[str],
                     push: Callable[[list[pulumi.Resource]], BuiltImage]) -> BuiltImage:
        """A model image on this platform image, its push (`push`, given what else it waits for) after the previous
        model's push on it, if any. The engine uploads a layer once per repository, and each model has its own:
        pushed at once, every model's push would compress and upload the platform's layers (hundreds of MB) again;
        one after the other, the first uploads them and the rest mount them from its repository (a
        cross-repository blob mount within the registry) and upload only their model's layer."""
        key = (image, context, target)
        previous = self.last_push.get(key)
        built = push([previous] if previous is not None else [])
        if built.push is not None:
            self.last_push[key] = built.push
        return built


def build_image(resource_name: str, *, parent: pulumi.Resource, stack: str, image: str, context: str,
                settings: BuildSettings, target: Optional[str] = None, push: Optional[PushTarget] = None,
                push_after: Optional[list[pulumi.Resource]] = None, model: Optional[ModelImage] = None) -> BuiltImage:
    """Build `context` as `built_image_name(...)` with BuildKit for the stage's platform; when a registry is
    given, also push it there once `push_after` (the registry) is up. With `model`, that model's image: the
    model's layer (`<resource_name>`) on the platform image (built locally, once per stage), pushed instead."""
    if model is not None:
        layer = model_layer(stack, image, context, settings, model.name, target)
        platform = model.platforms.build(stack, image, context, settings, target, layer)
        return model.platforms.pushed_after(image, context, target, lambda previous: _build(
            resource_name, parent=parent, stack=stack, image=f"{model.name}-{image}", context=layer.context,
            settings=settings, target=None, push=push, push_after=[*(push_after or []), *previous], layer=layer,
            after=[platform]))
    return _build(resource_name, parent=parent, stack=stack, image=image, context=context, settings=settings,
                  target=target, push=push, push_after=push_after)


def _build(resource_name: str, *, parent: pulumi.Resource, stack: str, image: str, context: str,
           settings: BuildSettings, target: Optional[str], push: Optional[PushTarget],
           push_after: Optional[list[pulumi.Resource]], layer: Optional[ModelLayer] = None,
           after: Optional[list[pulumi.Resource]] = None) -> BuiltImage:
    local = _image(resource_name, parent=parent, context=context, settings=settings, target=target, push=None,
                   image_name=built_image_name(stack, image, context, settings, target=target, layer=layer),
                   layer=layer, depends_on=after)
    if push is None:
        return BuiltImage(image_id=local.repo_digest, image_name=local.image_name, repo_digest=local.repo_digest)
    # The pushed copy is a second build of the same inputs, a BuildKit cache hit with the same image ID, in a
    # resource of its own: containers start from the local build at once instead of waiting for the push
    # (hundreds of MB into a registry that first has to start), and the push still goes through the engine,
    # so it works for a stage on a remote host too.
    pushed = _image(f"{resource_name}-push", parent=parent, context=context, settings=settings, target=target,
                    push=push, depends_on=[*(push_after or []), *(after or [])] or None, layer=layer,
                    image_name=pulumi.Output.from_input(push.server).apply(
                        lambda server: built_image_name(stack, image, context, settings, server, target, layer)))
    return BuiltImage(image_id=local.repo_digest, image_name=pushed.image_name, repo_digest=pushed.repo_digest,
                      push=pushed)


def pulled_image(resource_name: str, *, parent: pulumi.Resource, ref: str, platform: str,
                 depends_on: Optional[list[pulumi.Resource]] = None) -> docker.RemoteImage:
    """An image pulled by digest; the engine verifies every byte against the digest while pulling, so a
    tampered image in the registry fails the pull and the `pulumi up`."""
    return docker.RemoteImage(resource_name, name=ref, platform=platform, keep_locally=True,
                              opts=pulumi.ResourceOptions(parent=parent, depends_on=depends_on))


def image_id(resource_name: str, *, parent: pulumi.Resource, stack: str, image: str, source: ImageSource | str,
             settings: BuildSettings, depends_on: Optional[list[pulumi.Resource]] = None) -> pulumi.Output[str]:
    """The immutable ID a container should run: built from the repo, or pulled by digest."""
    if isinstance(source, ImageSource) and source.build is not None:
        return build_image(resource_name, parent=parent, stack=stack, image=image, context=source.build,
                           settings=settings).image_id
    ref = source.pulled_ref if isinstance(source, ImageSource) else source
    return pulled_image(resource_name, parent=parent, ref=ref, platform=settings.platform,
                        depends_on=depends_on).image_id


def pullable_image(resource_name: str, *, parent: pulumi.Resource, stack: str, image: str,
                   source: ImageSource | str, settings: BuildSettings, push: PushTarget,
                   push_after: list[pulumi.Resource], target: Optional[str] = None,
                   model: Optional[ModelImage] = None) -> pulumi.Input[str]:
    """What any node of a swarm can pull: a build pushed to the stage's registry, by digest, or the pinned
    reference."""
    if isinstance(source, ImageSource) and source.build is not None:
        return build_image(resource_name, parent=parent, stack=stack, image=image, context=source.build,
                           settings=settings, target=target, push=push, push_after=push_after,
                           model=model).repo_digest
    return source.pulled_ref if isinstance(source, ImageSource) else source
