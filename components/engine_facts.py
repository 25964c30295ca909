"""What the program reads from the engine that builds and runs a stage before it declares anything: the ID of
a base image named by a mutable tag (components/images.py puts it into the build inputs) and whether the
engine limits swap (components/runtimes.py declares a container's swap limit as the engine will store it).

The Pulumi program, `mlops train` and `mlops promote` read the stage's engine with the `docker` CLI at its
`docker.url`, so all three compute the same content tags: the program with the stack's TLS client material,
`mlops` with the operator's (`operators_docker_cli`). A rendering that involves no engine (`mlops plan`,
`mlops diff`, the mock-runtime tests) reads `NO_ENGINE`, and a caller puts any reader in place with
`reading_engines` (docs/day-two.md).
"""
from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Optional, Protocol

from components.docker_tls import ClientTls, stage_tls
from mlops_spec.errors import SpecError, excerpt
from mlops_spec.models import DockerHost, StageSpec


class Engine(Protocol):
    def image_id(self, image: str) -> str:
        """The ID of the engine's local image `image`, or "" when it has none by that name."""

    def limits_swap(self) -> bool:
        """Whether the engine can limit a container's swap (`docker info`'s SwapLimit: swap accounting)."""


@dataclass(frozen=True)
class DockerCli:
    """The engine of `host`, asked through the `docker` CLI as `mlops train` asks it; a TLS host with `tls`, the
    stack's client material (components/docker_tls.py)."""

    stage: str
    host: DockerHost
    tls: Optional[ClientTls] = None

    def _docker(self, *args: str) -> subprocess.CompletedProcess[str]:
        try:
            with self.tls.cert_path() if self.tls else nullcontext(None) as cert_path:
                return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=60,
                                      env=self.host.cli_environment(cert_path))
        except (OSError, subprocess.TimeoutExpired) as err:
            raise self._unreadable(args, str(err)) from None

    def _unreadable(self, args: tuple[str, ...], why: str) -> SpecError:
        return SpecError(file=f"stage {self.stage}", field="docker.url",
                         message=f"could not read the engine at {self.host.url} (`docker {' '.join(args)}`: "
                                 f"{excerpt(why.strip().splitlines()[0] if why.strip() else 'no answer')}); "
                                 "builds and containers depend on what it answers (docs/day-two.md)")

    def image_id(self, image: str) -> str:
        args = ("image", "inspect", "--format", "{{.Id}}", image)
        inspected = self._docker(*args)
        if inspected.returncode == 0:
            return inspected.stdout.strip()
        if "no such image" in inspected.stderr.lower():
            return ""
        raise self._unreadable(args, inspected.stderr)

    def limits_swap(self) -> bool:
        args = ("info", "--format", "{{json .SwapLimit}}")
        info = self._docker(*args)
        if info.returncode != 0 or info.stdout.strip() not in ("true", "false"):
            raise self._unreadable(args, info.stderr or info.stdout)
        return info.stdout.strip() == "true"


class NoEngine:
    """What a rendering without an engine assumes: no base image known by ID (the content tag holds the base
    image's name only) and an engine that limits swap, as the engines the stages run on do."""

    def image_id(self, image: str) -> str:
        return ""

    def limits_swap(self) -> bool:
        return True


NO_ENGINE = NoEngine()
EngineReader = Callable[[StageSpec], Engine]


def docker_cli(spec: StageSpec) -> Engine:
    """The stage's engine at its `docker.url`: what the program reads unless told otherwise."""
    return DockerCli(spec.stage, spec.docker, stage_tls(spec))


def operators_docker_cli(spec: StageSpec) -> Engine:
    """The stage's engine as `mlops` reaches it from an operator's machine: a TLS host with docker's own
    DOCKER_CERT_PATH (`DockerHost.cli_environment`), as its every other `docker` call does, since only a Pulumi
    program has the stack's config."""
    return DockerCli(spec.stage, spec.docker)


_READER: ContextVar[EngineReader] = ContextVar("engine_reader", default=docker_cli)


def engine_of(spec: StageSpec) -> Engine:
    """The engine of `spec`'s stage, as the current reader reaches it."""
    return _READER.get()(spec)


@contextmanager
def reading_engines(reader: EngineReader) -> Iterator[None]:
    """Within the block, `engine_of` reads engines with `reader`."""
    token = _READER.set(reader)
    try:
        yield
    finally:
        _READER.reset(token)
