"""`mlops plan`: the real Pulumi program run under the SDK's mock runtime, as a list of declared resources.

No CLI, engine, credentials or state is involved, so anyone can see what a stage declares, and
`mlops diff` can compare two renderings field by field. What the program would read from the stage's engine
(components/engine_facts.py) is what `NO_ENGINE` answers, unless a caller that has the engine passes its reader.
"""
from __future__ import annotations

import asyncio
import hashlib
import threading
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import pulumi
from pulumi.runtime import mocks as pulumi_mocks
from pulumi.runtime import rpc
from pulumi.runtime import settings as pulumi_settings

from components.engine_facts import NO_ENGINE, EngineReader, reading_engines
from mlops_spec.contract import DOCKER_TLS_KEYS, TRUSTED_MODEL_KEYS
from mlops_spec.models import StageSpec

SECRET_PLACEHOLDER = "[secret]"
PROJECT = "mlops-stack"
# Any value works for rendering: plans never show secrets, and mocks deploy nothing.
PLAN_SECRETS = {"mlops:registryPassword": "plan-placeholder-password",
                "mlops:mlflowPassword": "plan-placeholder-mlflow-password",
                **{f"mlops:{key}": f"plan-placeholder-{key}" for key in DOCKER_TLS_KEYS}}
# Not a secret, but plans read no stack's config either: a well-formed Ed25519 public key whose private half
# nobody kept.
PLAN_TRUSTED_MODEL_KEYS = """-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEABfQsneozbv7jlstOoW+WUgGnfHRCJ22V2X4yfIjSTog=
-----END PUBLIC KEY-----
"""


@dataclass(frozen=True)
class PlannedResource:
    type: str
    name: str
    parent: Optional[str]
    inputs: dict[str, Any]
    protect: bool
    retain_on_delete: bool = False
    delete_before_replace: bool = False
    dependencies: tuple[str, ...] = ()
    """Names of the resources it waits for: the SDK's `dependencies` (input outputs and `depends_on`, a
    component's expanded to its resources), as the engine orders `pulumi up`."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def redact(value: Any, reveal: bool = False) -> Any:
    """Replace every secret-marked value (and anything derived from one) by `[secret]`, or unwrap it
    when `reveal` is set (only the test fixture that starts a stage on a real engine needs that)."""
    if isinstance(value, dict):
        if value.get(rpc._special_sig_key) == rpc._special_secret_sig:
            return redact(value["value"], reveal) if reveal else SECRET_PLACEHOLDER
        return {key: redact(item, reveal) for key, item in value.items()}
    if isinstance(value, list):
        return [redact(item, reveal) for item in value]
    # The protocol carries every number as a double; ports and limits read better as integers.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested inputs as `path -> leaf`, e.g. `ports[0].external`, so plans read and diff line by line.

    Keys holding dots read as `labels[mlops.stage]`, so every path names one field unambiguously.
    Empty mappings and lists below the top are leaves, so adding or removing one still shows in a diff.
    """
    if not prefix and not value:
        return {}
    if isinstance(value, dict) and value:
        flat: dict[str, Any] = {}
        for key in sorted(value, key=str):
            name = str(key)
            path = f"{prefix}[{name}]" if "." in name or not name else f"{prefix}.{name}" if prefix else name
            flat |= flatten(value[key], path)
        return flat
    if isinstance(value, list) and value:
        flat = {}
        for index, item in enumerate(value):
            flat |= flatten(item, f"{prefix}[{index}]")
        return flat
    return {prefix: value}


def fake_digest(*parts: str) -> str:
    return "sha256:" + hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _on_a_closed_loop(call: Callable[[], Any]) -> Any:
    """Run a monitor call on an event loop that is closed when it returns. The SDK calls the monitor from
    executor threads, where the mock monitor otherwise opens a loop per thread that nobody closes: the
    garbage collector closes it at exit, may finalize its self-pipe socket first, and then prints
    "Exception ignored in: BaseEventLoop.__del__ ... Invalid file descriptor: -1" to stderr."""
    if threading.current_thread() is threading.main_thread():
        return call()
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return call()
    finally:
        asyncio.set_event_loop(None)
        loop.close()


class _RecordingMonitor(pulumi_mocks.MockMonitor):
    """Records each registration with its parent and the options that decide what a delete or a
    replacement does (protect, retainOnDelete, deleteBeforeReplace), which `Mocks.new_resource` never sees."""

    def __init__(self, mocks: pulumi.runtime.Mocks) -> None:
        super().__init__(mocks)
        self.registrations: list[tuple[str, Any]] = []

    def RegisterResource(self, request):  # noqa: N802 - the gRPC method name
        response = _on_a_closed_loop(lambda: super(_RecordingMonitor, self).RegisterResource(request))
        self.registrations.append((response.urn, request))
        return response

    def Invoke(self, request):  # noqa: N802
        return _on_a_closed_loop(lambda: super(_RecordingMonitor, self).Invoke(request))

    def ReadResource(self, request):  # noqa: N802
        return _on_a_closed_loop(lambda: super(_RecordingMonitor, self).ReadResource(request))

    def planned(self, reveal_secrets: bool = False) -> list[PlannedResource]:
        """Resources in tree order (parents first, siblings by name), so renderings compare line by line."""
        names = {urn: request.name for urn, request in self.registrations}
        children: dict[Optional[str], list[tuple[str, Any]]] = {}
        for urn, request in self.registrations:
            parent = request.parent if request.parent in names else None
            children.setdefault(parent, []).append((urn, request))
        ordered: list[PlannedResource] = []

        def visit(parent: Optional[str]) -> None:
            for urn, request in sorted(children.get(parent, []), key=lambda item: (item[1].name, item[1].type)):
                ordered.append(PlannedResource(
                    type=request.type, name=request.name, parent=names.get(request.parent),
                    inputs=redact(rpc.deserialize_properties(request.object), reveal_secrets), protect=bool(request.protect),
                    retain_on_delete=bool(request.retainOnDelete), delete_before_replace=bool(request.deleteBeforeReplace),
                    dependencies=tuple(sorted(names[dependency] for dependency in request.dependencies))))
                visit(urn)

        visit(None)
        return ordered


class _PlanMocks(pulumi.runtime.Mocks):
    """Resolves what the Docker provider would compute (image digests) and otherwise echoes inputs."""

    def new_resource(self, args: pulumi.runtime.MockResourceArgs):
        state = dict(args.inputs)
        if args.typ == "docker:index/image:Image":
            state["repoDigest"] = fake_digest(str(args.inputs.get("imageName")))
        elif args.typ == "docker:index/remoteImage:RemoteImage":
            state["repoDigest"] = args.inputs.get("name")
            state["imageId"] = fake_digest(str(args.inputs.get("name")))
        return f"{args.name}-id", state

    def call(self, args: pulumi.runtime.MockCallArgs):
        return {}


def mock_runtime(stack: str, config: Optional[dict[str, str]] = None) -> _RecordingMonitor:
    """Point the Pulumi SDK at a fresh recording mock monitor for `stack`, with `config` over the
    placeholder secrets; returns the monitor, whose `planned()` lists what the program declared."""
    # The SDK schedules on the current event loop, and a caller's `asyncio.run` leaves none behind.
    asyncio.set_event_loop(asyncio.new_event_loop())
    monitor = _RecordingMonitor(_PlanMocks())
    # `set_mocks` keeps the root stack resource of an earlier rendering, which would parent this one's
    # resources to a stack this monitor never saw; `mlops diff` renders twice per process.
    pulumi_settings.ROOT.set(None)
    pulumi.runtime.set_mocks(monitor.mocks, project=PROJECT, stack=stack, preview=False, monitor=monitor)
    pulumi.runtime.set_all_config({**PLAN_SECRETS, f"mlops:{TRUSTED_MODEL_KEYS}": PLAN_TRUSTED_MODEL_KEYS,
                                   **(config or {})}, secret_keys=list(PLAN_SECRETS))
    return monitor


def render(stack: str, spec: StageSpec, config: Optional[dict[str, str]] = None,
           reveal_secrets: bool = False, engines: EngineReader = lambda spec: NO_ENGINE) -> list[PlannedResource]:
    """Run the Pulumi program for `stack` under mocks and return every resource it declares; it reads its
    engine's facts with `engines`."""
    from mlops.program import declare_stack

    monitor = mock_runtime(stack, config)

    @pulumi.runtime.test
    def program():
        return declare_stack(stack, spec).urn

    try:
        with reading_engines(engines):
            program()
        return monitor.planned(reveal_secrets)
    finally:
        _close_event_loop()


def _close_event_loop() -> None:
    """Close the rendering's event loop and its executor threads as `asyncio.run` would (see `_on_a_closed_loop`)."""
    loop = asyncio.get_event_loop_policy().get_event_loop()
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_default_executor())
    loop.close()


SERVICE_TYPE = "docker:index/service:Service"


def update_policy(resource: PlannedResource) -> Optional[str]:
    """How Swarm rolls out a change of a service, in one line; None for anything but a service."""
    if resource.type != SERVICE_TYPE:
        return None
    update = resource.inputs.get("updateConfig") or {}
    rollback = resource.inputs.get("rollbackConfig") or {}
    converge = resource.inputs.get("convergeConfig")
    waits = f"pulumi up waits up to {converge['timeout']} for it" if converge else "pulumi up does not wait for it"
    return (f"{update.get('parallelism')} task at a time, {update.get('order')}, each watched for "
            f"{update.get('monitor')}, any failure (max ratio {update.get('maxFailureRatio')}) → "
            f"{update.get('failureAction')}; the rollback goes {rollback.get('parallelism')} at a time, "
            f"{rollback.get('order')}, and on failure → {rollback.get('failureAction')}; {waits}")
