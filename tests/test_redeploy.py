"""Deploying a stage again: an unchanged rendering changes nothing on the engine, and a change replaces
only the containers it must, keeping the data in the volumes.

The proof comes from the engine: container and image IDs before and after, and the engine's own event
stream over each deploy. Image IDs alone could not show that nothing was rebuilt (a build served from
the cache gives the same ID), but every build tags its image, every push and pull and every container
or volume created or removed shows up as an event.
"""
from __future__ import annotations

import json
import re
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from mlops.modelstore import BasicAuth
from mlops_spec.contract import ADMIN, IDENTITIES, READER, TRAINER, derived_password
from mlops_spec.loading import load_stage
from tests.conftest import private_copy_of_dev
from tests.engine import IMAGE, StageOnEngine
from tests.readback import differences
from tests.test_end_to_end import free_port, http_json

pytestmark = pytest.mark.docker

# What a deploy changes, as (event type, action); health checks, mounts and network connections of
# containers that are created anyway are left out, and so is a volume's "create", which the engine
# reports for every named volume a new container mounts, whether it exists or not.
CHANGES = {("container", "create"), ("container", "destroy"), ("image", "tag"), ("image", "push"),
           ("image", "pull"), ("image", "delete"), ("volume", "destroy"), ("network", "create"),
           ("network", "destroy")}
MODEL, OTHER_MODEL = "iris-classifier", "diabetes-regressor"


@dataclass
class Stage:
    engine: StageOnEngine
    environments: Path
    mlflow_port: int

    def edit(self, overrides: dict) -> None:
        """The stage file with `overrides` merged over it, as the next deploy sees it."""
        self.engine.spec = load_stage(self.engine.stack, self.environments, overrides=overrides)


@pytest.fixture
def stage(docker_engine, environments) -> Iterator[Stage]:
    """A private copy of dev on free host ports with both shipped models, each served by two replicas that follow
    `latest` (they need no model to be deployed, so nothing has to be trained)."""
    name = f"t-redeploy-{uuid.uuid4().hex[:6]}"
    ports = {"mlflow": free_port(), "gateway": free_port()}
    spec = private_copy_of_dev(name, ports, models=(MODEL, OTHER_MODEL))
    spec["serving"]["replicas"] = 2
    spec["models"] = {model: {"release": {"version": "latest"}} for model in (MODEL, OTHER_MODEL)}
    (environments / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    engine = StageOnEngine(stack=name, spec=load_stage(name, environments), registry_password=uuid.uuid4().hex)
    yield Stage(engine, environments, ports["mlflow"])
    engine.teardown()


def containers(engine: StageOnEngine) -> dict[str, str]:
    return {container.name: container.id for container in
            engine.client.containers.list(all=True, filters={"label": f"mlops.stack={engine.stack}"})}


def images(engine: StageOnEngine) -> dict[str, str]:
    names = [resource.inputs["imageName"] for resource in engine.resources() if resource.type == IMAGE]
    return {name: engine.client.images.get(name).id for name in names}


@contextmanager
def changes_on_engine(engine: StageOnEngine) -> Iterator[set[tuple[str, str, str]]]:
    """Collects (type, action, name) of the stack's changes the engine reports while the block runs.

    Subscribed before the block rather than asked afterwards with `since`: the engine replays only its
    last 256 events, which the health checks of a busy shared engine overrun within seconds."""
    changes: set[tuple[str, str, str]] = set()
    stream = engine.client.events(decode=True, filters={"event": sorted({action for _, action in CHANGES})})

    def collect() -> None:
        for event in stream:
            actor = event["Actor"]
            if (event["Type"], event["Action"]) in CHANGES and engine.stack in json.dumps(actor):
                changes.add((event["Type"], event["Action"], actor["Attributes"].get("name", actor["ID"])))

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    yield changes
    time.sleep(2)  # for the events of the block's last moments to arrive
    stream.close()
    reader.join(10)


def test_a_second_deploy_changes_nothing_and_a_change_replaces_only_what_it_must(stage):
    engine, stack = stage.engine, stage.engine.stack
    mlflow = f"http://127.0.0.1:{stage.mlflow_port}/api/2.0/mlflow/registered-models"
    deployed = engine.deploy()
    runs = {name: container.attrs["Config"]["Image"] for name, container in deployed.items()}
    # The replica runs its local build of the model's serving image, which dev keeps on its engine, pushed nowhere.
    for model in (MODEL, OTHER_MODEL):
        built = engine.client.images.get(runs[f"{stack}-{model}-blue-0"])
        assert any(re.fullmatch(rf"mlops-{stack}/{model}-serving:[0-9a-f]{{16}}", tag) for tag in built.tags), built.tags
        assert built.attrs["RepoDigests"] == [], "dev pushes nothing"
    assert all(re.fullmatch(r"(\S+@)?sha256:[0-9a-f]{64}", image) for image in runs.values()), runs
    trainer, reader = (BasicAuth(name, derived_password(engine.mlflow_password, name)) for name in (TRAINER, READER))
    http_json(f"{mlflow}/create", {"name": "kept-across-deploys"}, auth=trainer)
    first_containers, first_images = containers(engine), images(engine)
    # Each workload with secrets has a container, created and never started, that wrote them into its volume.
    writers = {f"{stack}-model-registry-secrets", *(f"{stack}-{model}-blue-secrets" for model in (MODEL, OTHER_MODEL))}
    assert set(first_containers) == {f"{stack}-model-registry", f"{stack}-gateway", *writers,
                                     *(f"{stack}-{model}-blue-{index}" for model in (MODEL, OTHER_MODEL)
                                       for index in (0, 1))}
    assert not [name for name in writers if engine.client.containers.get(name).attrs["State"]["StartedAt"][:4] != "0001"]

    with changes_on_engine(engine) as changes:
        engine.deploy()
    assert changes == set()
    # Nor would the provider: what its Read stores of each object is what the rendering declares.
    assert differences(engine) == []
    assert (containers(engine), images(engine)) == (first_containers, first_images)

    # `cpus` is ForceNew in the provider too: one model's replicas are replaced, nothing else is touched, the
    # other model's replicas least of all.
    stage.edit({"models": {MODEL: {"limits": {"cpus": 0.5, "memory_mb": 512}}}})
    with changes_on_engine(engine) as changes:
        engine.deploy()
    replicas = {f"{stack}-{MODEL}-blue-0", f"{stack}-{MODEL}-blue-1"}
    assert changes == {("container", action, replica) for action in ("destroy", "create") for replica in replicas}
    second_containers = containers(engine)
    assert {name for name in first_containers if second_containers[name] != first_containers[name]} == replicas
    assert images(engine) == first_images
    assert engine.client.containers.get(f"{stack}-{MODEL}-blue-0").attrs["HostConfig"]["NanoCpus"] == 500_000_000
    assert engine.client.containers.get(f"{stack}-{OTHER_MODEL}-blue-0").attrs["HostConfig"]["NanoCpus"] == 1_000_000_000

    # Replacing MLflow's container keeps its volumes, so the registered model, the users and their grants
    # are still there.
    stage.edit({"models": {MODEL: {"limits": {"cpus": 0.5, "memory_mb": 512}}}, "model_registry": {"limits": {"cpus": 1.5}}})
    with changes_on_engine(engine) as changes:
        engine.deploy()
    mlflow_container = f"{stack}-model-registry"
    assert changes == {("container", "destroy", mlflow_container), ("container", "create", mlflow_container)}
    third_containers = containers(engine)
    assert {name for name in second_containers if third_containers[name] != second_containers[name]} == {mlflow_container}
    registered = http_json(f"{mlflow}/search", auth=reader)["registered_models"]
    assert [model["name"] for model in registered] == ["kept-across-deploys"]

    # A new MLflow secret: the writers write the new files, and only the containers that read them are replaced.
    old_secret, engine.mlflow_password = engine.mlflow_password, uuid.uuid4().hex
    with changes_on_engine(engine) as changes:
        engine.deploy()
    readers = {mlflow_container, *replicas, f"{stack}-{OTHER_MODEL}-blue-0", f"{stack}-{OTHER_MODEL}-blue-1"}
    assert changes == {("container", action, name) for action in ("destroy", "create") for name in readers | writers}
    assert differences(engine) == []
    reader = BasicAuth(READER, derived_password(engine.mlflow_password, READER))
    assert [model["name"] for model in http_json(f"{mlflow}/search", auth=reader)["registered_models"]] == [
        "kept-across-deploys"]
    replica = engine.client.containers.get(f"{stack}-{MODEL}-blue-0")
    read = replica.exec_run(["sh", "-c", 'cat "$MLFLOW_TRACKING_PASSWORD_FILE"'], user="10001:10001")
    assert (read.exit_code, read.output.decode()) == (0, reader.password)
    # No secret, old or new, is in any container's configuration or its first process's environment.
    secrets = [secret for value in (old_secret, engine.mlflow_password)
               for secret in (value, *(derived_password(value, identity) for identity in (ADMIN, *IDENTITIES)))]
    for name in containers(engine):
        container = engine.client.containers.get(name)
        environment = (container.exec_run(["cat", "/proc/1/environ"]).output.decode(errors="replace")
                       if container.status == "running" else "")
        assert not [secret for secret in secrets if secret in json.dumps(container.attrs) + environment], name
