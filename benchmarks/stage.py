"""A dev stage on the local engine for figures 1 and 4, created by the test fixture from what the
program renders (`tests/engine.py`), with a unique stack name and host ports of its own."""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import urllib.request
from typing import Optional

import docker

from benchmarks.model import MODEL_NAME, MlflowRegistry
from mlops.modelstore import BasicAuth
from mlops_spec.contract import MLFLOW_PORT, TRAINER, derived_password, model_registry_name
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


def dev_spec(image_registry: bool = True, docker_chooses_ports: bool = False) -> StageSpec:
    """dev as shipped, on free host ports (or Docker's choice: only possible without the image registry,
    whose port is part of the pushed images' names)."""
    ports = [None] * len(PUBLISHED) if docker_chooses_ports else free_ports(len(PUBLISHED))
    overrides: dict = {part: {"port": {"host_port": port}} for part, port in zip(PUBLISHED, ports)}
    overrides["image_registry"]["enabled"] = image_registry
    return load_stage("dev", overrides=overrides)


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
    """Registers the model in the stage's MLflow as soon as it answers, while `deploy` carries on, as
    `mlops train` would on a fresh stage: dev replicas serve the newest version, so they need one."""

    def __init__(self, stage: StageOnEngine, payload: bytes, timeout_s: float) -> None:
        super().__init__(name=f"seed-{stage.stack}", daemon=True)
        self.stage, self.payload, self.timeout_s = stage, payload, timeout_s
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
            MlflowRegistry(tracking_uri, trainer).register(MODEL_NAME, self.payload)
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


def deploy_with_model(stage: StageOnEngine, payload: bytes, timeout_s: float = 300) -> tuple[dict, float]:
    """`stage.deploy()` with the model registered alongside, until every container is healthy: the
    containers by name, and when (`time.time()`) MLflow first answered."""
    seeder = ModelSeeder(stage, payload, timeout_s)
    seeder.start()
    try:
        containers = stage.deploy()
        # Like `pulumi up`, the deploy does not wait for dev's replicas (they follow `latest`, `wait: false`).
        stage.wait_healthy(list(containers.values()), timeout_s)
    finally:
        seeder.join(timeout_s)
        if seeder.error is not None:
            raise RuntimeError(f"registering the model in {stage.stack} failed: {seeder.error}") from seeder.error
    if seeder.mlflow_answered_at is None:
        raise RuntimeError(f"{stage.stack}'s MLflow did not answer within {timeout_s:.0f}s")
    return containers, seeder.mlflow_answered_at
