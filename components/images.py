"""Images built from this repo, tagged by a hash of everything that goes into them.

The tag changes exactly when an input changes, so an unchanged context never rebuilds and containers
that run the image's ID are replaced exactly when the image is.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pulumi
import pulumi_docker as docker

from mlops.spec import REPO_ROOT, ImageSource

IGNORED_PARTS = {"wheels", "wheels.partial", "__pycache__", ".pytest_cache"}


def context_files(context: Path) -> list[Path]:
    """The files of a build context that define the image; `wheels/` is derived from the lock, and
    `wheels.partial/` is scripts/fetch-wheels.sh's download in progress (hashing it slowed every plan)."""
    return sorted(path for path in context.rglob("*")
                  if path.is_file() and not IGNORED_PARTS.intersection(path.relative_to(context).parts)
                  and path.suffix != ".pyc")


def content_tag(context: str, build_args: dict[str, str], target: Optional[str] = None) -> str:
    root = REPO_ROOT / context
    digest = hashlib.sha256()
    for key, value in sorted({**build_args, "target": target or ""}.items()):
        digest.update(f"{key}={value}\n".encode())
    for path in context_files(root):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class PushTarget:
    server: pulumi.Input[str]
    username: str
    password: pulumi.Input[str]


def built_image_name(stack: str, image: str, context: str, base_image: str, registry_server: Optional[str] = None,
                     target: Optional[str] = None) -> str:
    """The name `build_image` gives `context`'s image: `<registry server>/<stack>/<image>:<content hash>` when
    pushed, else `mlops-<stack>/<image>:<content hash>`. `mlops train` finds the image the stack built by it."""
    repository = f"{stack}/{image}:{content_tag(context, {'BASE_IMAGE': base_image}, target)}"
    return f"{registry_server}/{repository}" if registry_server else f"mlops-{repository}"


def build_image(resource_name: str, *, parent: pulumi.Resource, stack: str, image: str, context: str,
                base_image: str, target: Optional[str] = None, push: Optional[PushTarget] = None,
                depends_on: Optional[list[pulumi.Resource]] = None) -> docker.Image:
    """Build `context` as `built_image_name(...)`, pushed when a registry is given."""
    build_args = {"BASE_IMAGE": base_image}
    image_name = (pulumi.Output.from_input(push.server).apply(
                      lambda server: built_image_name(stack, image, context, base_image, server, target))
                  if push else built_image_name(stack, image, context, base_image, target=target))
    return docker.Image(
        resource_name,
        image_name=image_name,
        # Relative to the project folder, where Pulumi runs the program: renderings match on every clone.
        build=docker.DockerBuildArgs(context=context, dockerfile=f"{context}/Dockerfile",
                                     args=build_args, target=target),
        skip_push=push is None,
        registry=docker.RegistryArgs(server=push.server, username=push.username, password=push.password) if push else None,
        opts=pulumi.ResourceOptions(parent=parent, depends_on=depends_on),
    )


def image_id(resource_name: str, *, parent: pulumi.Resource, stack: str, image: str, source: ImageSource | str,
             base_image: str) -> pulumi.Output[str]:
    """The immutable ID a container should run: built from the repo, or pulled by digest."""
    if isinstance(source, ImageSource) and source.build is not None:
        return build_image(resource_name, parent=parent, stack=stack, image=image, context=source.build,
                           base_image=base_image).repo_digest
    ref = source.ref if isinstance(source, ImageSource) else source
    return docker.RemoteImage(resource_name, name=ref, keep_locally=True,
                              opts=pulumi.ResourceOptions(parent=parent)).image_id
