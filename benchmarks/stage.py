"""A dev stage on the local engine for figures 1, 4, 5 and 6, created by the test fixture from what the
program renders (`tests/engine.py`), with a unique stack name and host ports of its own, serving dev's models
or only some of them."""
from __future__ import annotations

import contextlib
import os
import secrets
import socket
import threading
import time
import urllib.request
from typing import Iterator, Mapping, Optional, Sequence

import docker

from benchmarks.model import MlflowRegistry, payloads
from mlops.modelstore import BasicAuth
from mlops_spec.contract import MLFLOW_PORT, TRAINER, derived_password, model_registry_name, serving_name
from mlops_spec.loading import load_stage
from mlops_spec.models import StageSpec
from tests.engine import StageOnEngine

PUBLISHED = ("model_registry", "image_registry", "serving")


def free_ports(count: int) -> list[int]:
    """Distinct ports free on the loopback right now: each probe stays bound until all are chosen."""
    with contextlib.ExitStack() as probes:
        ports = []
        for _ in range(count):
            probe = probes.enter_context(socket.socket())
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
        return ports


def unique_stack(purpose: str) -> str:
    return f"bench-{purpose}-{os.getpid()}-{int(time.time())}"


def serving_only(spec: StageSpec, models: Sequence[str]) -> StageSpec:
    """`spec` with only `models` of those it declares: a stage file's overrides can change a model dev.yaml
    declares, never remove it."""
    unknown = sorted(set(models) - spec.models.keys())
    if unknown:
        raise ValueError(f"stage {spec.stage} declares no model {', '.join(unknown)}; it has {', '.join(spec.models)}")
    return spec.model_copy(update={"models": {name: spec.models[name] for name in models}})


def dev_spec(image_registry: bool = False, docker_chooses_ports: bool = False,
             models: Optional[Sequence[str]] = None) -> StageSpec:
    """dev as shipped, on free host ports (or Docker's choice); `image_registry`: with an image registry that dev
    pushes its images into, as a dev on a swarm has (its port is then part of the pushed images' names, so Docker
    may not choose it); `models`: serve only these of dev's models."""
    ports = [None] * len(PUBLISHED) if docker_chooses_ports else free_ports(len(PUBLISHED))
    overrides: dict = {part: {"port": {"host_port": port}} for part, port in zip(PUBLISHED, ports)}
    overrides["image_registry"]["enabled"] = image_registry
    spec = load_stage("dev", overrides=overrides)
    return spec if models is None else serving_only(spec, models)


def served(spec: StageSpec) -> list[str]:
    return [model.name for model in spec.served_models()]


def first_replica(stack: str, model: str) -> str:
    """The container name of a model's first blue replica on one host."""
    return f"{serving_name(stack, model, 'blue')}-0"


def wait_ready(url: str, timeout_s: float) -> None:
    """Until `url` answers a success (an HTTP error status counts as not ready yet)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout_s:.0f}s") from None
            time.sleep(0.2)


class ModelSeeder(threading.Thread):
    """Registers a version of every model the stage serves in its MLflow as soon as it answers, while `deploy`
    carries on, as `mlops train` would on a fresh stage: dev replicas serve the newest version, so they need one."""

    def __init__(self, stage: StageOnEngine, payloads: Mapping[str, bytes], timeout_s: float) -> None:
        super().__init__(name=f"seed-{stage.stack}", daemon=True)
        self.stage, self.payloads, self.timeout_s = stage, payloads, timeout_s
        self.error: Optional[BaseException] = None
        self.mlflow_answered_at: Optional[float] = None
        """`time.time()` when MLflow first answered its health endpoint."""

    def run(self) -> None:
        try:
            deadline = time.monotonic() + self.timeout_s
            tracking_uri = f"http://127.0.0.1:{self._mlflow_port(deadline)}"
            wait_ready(f"{tracking_uri}/health", deadline - time.monotonic())
            self.mlflow_answered_at = time.time()
            trainer = BasicAuth(TRAINER, derived_password(self.stage.mlflow_password, TRAINER))
            registry = MlflowRegistry(tracking_uri, trainer)
            for model, payload in self.payloads.items():
                registry.register(model, payload)
        except BaseException as error:  # handed to the deploying thread, which reports it
            self.error = error

    def _mlflow_port(self, deadline: float) -> int:
        name = model_registry_name(self.stage.stack)
        while True:
            try:
                return self.stage.host_port(name, MLFLOW_PORT)
            except (docker.errors.NotFound, KeyError, IndexError, TypeError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} was not started within {self.timeout_s:.0f}s") from None
                time.sleep(0.1)


def check_payloads(spec: StageSpec, payloads: Mapping[str, bytes]) -> None:
    """A payload for every model `spec` serves: a dev replica of a model without a registered version never turns
    healthy, so the deploy would wait out its timeout instead."""
    missing = sorted(set(served(spec)) - payloads.keys())
    if missing:
        raise ValueError(f"stage {spec.stage} serves {', '.join(missing)} too, and no replica of it turns healthy "
                         "without a registered version: pass a payload for it")


def started(containers: Mapping[str, docker.models.containers.Container]) -> list[docker.models.containers.Container]:
    """The containers a deploy started: all but the workloads' secrets writers, created and never started (`start:
    false`), which never turn healthy."""
    return [container for container in containers.values() if container.status != "created"]


def deploy_with_models(stage: StageOnEngine, payloads: Mapping[str, bytes],
                       timeout_s: float = 300) -> tuple[dict, float]:
    """`stage.deploy()` with a version of each model it serves registered alongside (`payloads`, by model),
    until every container is healthy: the containers by name, and when (`time.time()`) MLflow first answered."""
    check_payloads(stage.spec, payloads)
    seeder = ModelSeeder(stage, payloads, timeout_s)
    seeder.start()
    try:
        containers = stage.deploy()
        # Like `pulumi up`, the deploy does not wait for dev's replicas (they follow `latest`, `wait: false`).
        stage.wait_healthy(started(containers), timeout_s)
    finally:
        seeder.join(timeout_s)
        if seeder.error is not None:
            raise RuntimeError(f"registering the models in {stage.stack} failed: {seeder.error}") from seeder.error
    if seeder.mlflow_answered_at is None:
        raise RuntimeError(f"{stage.stack}'s MLflow did not answer within {timeout_s:.0f}s")
    return containers, seeder.mlflow_answered_at


@contextlib.contextmanager
def deployed(purpose: str, spec: StageSpec, cpus: Optional[str] = None) -> Iterator[tuple[StageOnEngine, dict]]:
    """A new stack `bench-<purpose>-…` of `spec`, every model it serves registered and every container healthy
    (and pinned to `cpus`, if given): the stage and its containers by name. Torn down on leaving."""
    stage = StageOnEngine(stack=unique_stack(purpose), spec=spec, registry_password=secrets.token_hex(16))
    try:
        started, _ = deploy_with_models(stage, payloads(served(spec)))
        if cpus is not None:
            for container in started.values():
                container.update(cpuset_cpus=cpus)
        yield stage, started
    finally:
        stage.teardown()
