"""The replace-or-update table of `mlops.replacements` against hand-checked provider behaviour, its coverage
of the installed pulumi-docker SDK, and the resource options `mlops plan` records for it."""
from __future__ import annotations

import json
import re

import pulumi_docker
import pytest
from pulumi import _types as pulumi_types
from pulumi_docker import _inputs
from typer.testing import CliRunner

from mlops.cli import app
from mlops.diff import ABSENT, FieldChange, classify
from mlops.replacements import RULES, prefixes, schema_path

CONTAINER = "docker:index/container:Container"
VOLUME = "docker:index/volume:Volume"
IMAGE = "docker:index/image:Image"


def verdict(resource_type: str, before: dict, after: dict):
    """Classify the changed paths between two flattened input maps."""
    changed = [FieldChange(path, before.get(path, ABSENT), after.get(path, ABSENT))
               for path in dict.fromkeys([*before, *after]) if before.get(path, ABSENT) != after.get(path, ABSENT)]
    return classify(resource_type, tuple(changed), before, after)


@pytest.mark.parametrize(("resource_type", "before", "after", "action", "forced_by"), [
    # Container (resource_docker_container.go): `cpus` is ForceNew; memory, swap and restart policy are
    # what resourceDockerContainerUpdate applies to the running container.
    (CONTAINER, {"cpus": "1"}, {"cpus": "2"}, "replace", ("cpus",)),
    (CONTAINER, {"memory": 512}, {"memory": 1024}, "update", ()),
    (CONTAINER, {"memorySwap": 512}, {"memorySwap": 1024}, "update", ()),
    (CONTAINER, {"restart": "no"}, {"restart": "unless-stopped"}, "update", ()),
    (CONTAINER, {"labels[0].label": "mlops.owner", "labels[0].value": "a"},
     {"labels[0].label": "mlops.owner", "labels[0].value": "b"}, "replace", ("labels",)),
    (CONTAINER, {"ports[0].internal": 80, "ports[0].external": 8080},
     {"ports[0].internal": 80, "ports[0].external": 8081}, "replace", ("ports",)),
    # Optional+Computed: removing it keeps the container's value, so nothing happens.
    (CONTAINER, {"hostname": "a"}, {}, "none", ()),
    (CONTAINER, {"ports[0].internal": 80, "ports[0].external": 8080}, {"ports[0].internal": 80}, "none", ()),
    # An input pulumi-docker 5.2.0 adds past the provider source on record: assumed to replace.
    (CONTAINER, {}, {"deviceCgroupRules[0]": "c 1:3 rwm"}, "replace", ("deviceCgroupRules",)),
    # Volume (resource_docker_volume.go): every field of a local volume is ForceNew.
    (VOLUME, {"labels[0].label": "mlops.owner", "labels[0].value": "a"},
     {"labels[0].label": "mlops.owner", "labels[0].value": "b"}, "replace", ("labels",)),
    (VOLUME, {"name": "dev-artifacts"}, {"name": "dev-models"}, "replace", ("name",)),
    (VOLUME, {"driverOpts.type": "tmpfs"}, {"driverOpts.type": "nfs"}, "replace", ("driverOpts",)),
    (VOLUME, {"cluster.availability": "active"}, {"cluster.availability": "drain"}, "update", ()),
    # Adding the cluster block sets its defaulted ForceNew fields (scope, sharing, type).
    (VOLUME, {}, {"cluster.availability": "active"}, "replace", ("cluster",)),
    (VOLUME, {"cluster.scope": "single"}, {"cluster.scope": "multi"}, "replace", ("cluster.scope",)),
    # Network and Secret (no update function): anything replaces.
    ("docker:index/network:Network", {"driver": "bridge"}, {"driver": "overlay"}, "replace", ("driver",)),
    ("docker:index/secret:Secret", {"data": "[secret]", "name": "a"}, {"data": "[secret]", "name": "b"},
     "replace", ("name",)),
    # The native Image (pulumi-docker provider.go Diff) never replaces; registry credentials are not diffed.
    (IMAGE, {"build.context": "images/serving"}, {"build.context": "images/serving2"}, "update", ()),
    (IMAGE, {"build.args.BASE_IMAGE": "a"}, {"build.args.BASE_IMAGE": "b"}, "update", ()),
    (IMAGE, {"registry.server": "localhost:5001"}, {"registry.server": "localhost:5101"}, "update", ()),
    (IMAGE, {"registry.username": "a"}, {"registry.username": "b"}, "none", ()),
    # RemoteImage: `build` is a one-element set, so even its non-ForceNew `remove` replaces.
    ("docker:index/remoteImage:RemoteImage", {"keepLocally": False}, {"keepLocally": True}, "update", ()),
    ("docker:index/remoteImage:RemoteImage", {"build.context": "x", "build.remove": True},
     {"build.context": "x", "build.remove": False}, "replace", ("build",)),
    # The provider: no config field forces a provider replacement in pulumi-docker.
    ("pulumi:providers:docker", {"host": "unix:///var/run/docker.sock"}, {"host": "ssh://ops@gpu-1"}, "update", ()),
    ("pulumi:providers:docker", {"registryAuth[0].address": "localhost:5001"},
     {"registryAuth[0].address": "localhost:5101"}, "update", ()),
    # Service: a mount is a set element, replaced whole; it replaces the service only when it carries
    # volume labels (ForceNew); the image updates in place.
    ("docker:index/service:Service", {"taskSpec.containerSpec.image": "a"}, {"taskSpec.containerSpec.image": "b"},
     "update", ()),
    ("docker:index/service:Service",
     {"taskSpec.containerSpec.mounts[0].source": "a", "taskSpec.containerSpec.mounts[0].target": "/d"},
     {"taskSpec.containerSpec.mounts[0].source": "b", "taskSpec.containerSpec.mounts[0].target": "/d"}, "update", ()),
    ("docker:index/service:Service",
     {"taskSpec.containerSpec.mounts[0].source": "a", "taskSpec.containerSpec.mounts[0].volumeOptions.labels[0].label": "k",
      "taskSpec.containerSpec.mounts[0].volumeOptions.labels[0].value": "v"},
     {"taskSpec.containerSpec.mounts[0].source": "b", "taskSpec.containerSpec.mounts[0].volumeOptions.labels[0].label": "k",
      "taskSpec.containerSpec.mounts[0].volumeOptions.labels[0].value": "v"}, "replace",
     ("taskSpec.containerSpec.mounts",)),
    # `mode` is ForceNew as a list: switching modes replaces, scaling updates in place.
    ("docker:index/service:Service", {"mode.replicated.replicas": 1}, {"mode.replicated.replicas": 2}, "update", ()),
    ("docker:index/service:Service", {"mode.replicated.replicas": 1}, {"mode.global": True}, "replace",
     ("mode.global",)),
    ("docker:index/serviceConfig:ServiceConfig", {"data": "e30="}, {"data": "e31="}, "replace", ("data",)),
])
def test_hand_checked_cases(resource_type, before, after, action, forced_by):
    result = verdict(resource_type, before, after)
    assert (result.action, result.replace_fields) == (action, forced_by)


def test_a_healthcheck_update_says_the_running_container_keeps_its_old_one():
    result = verdict(CONTAINER, {"healthcheck.interval": "5s"}, {"healthcheck.interval": "10s"})
    assert result.action == "update"
    assert any(note.startswith("healthcheck: recorded in Pulumi's state only") for note in result.notes)


def test_a_new_docker_host_updates_the_provider_and_moves_nothing():
    result = verdict("pulumi:providers:docker", {"host": "unix:///var/run/docker.sock"}, {"host": "ssh://ops@gpu-1"})
    assert any("not recreated on the new daemon" in note for note in result.notes)


def test_paths_name_fields_indices_and_map_keys():
    assert prefixes("mounts[2].target") == [("mounts", "mounts[2]"), ("mounts.target", "mounts[2].target")]
    assert schema_path("labels[mlops.stage]") == "labels"
    assert schema_path("taskSpec.containerSpec.mounts[0].volumeOptions.labels[1].value") == \
        "taskSpec.containerSpec.mounts.volumeOptions.labels.value"


SDK_ARGS = {
    CONTAINER: pulumi_docker.ContainerArgs, VOLUME: pulumi_docker.VolumeArgs,
    "docker:index/network:Network": pulumi_docker.NetworkArgs, IMAGE: pulumi_docker.ImageArgs,
    "docker:index/remoteImage:RemoteImage": pulumi_docker.RemoteImageArgs,
    "pulumi:providers:docker": pulumi_docker.ProviderArgs, "docker:index/service:Service": pulumi_docker.ServiceArgs,
    "docker:index/secret:Secret": pulumi_docker.SecretArgs,
    "docker:index/serviceConfig:ServiceConfig": pulumi_docker.ServiceConfigArgs,
}
# Inputs of the pinned 5.2.0 SDK that kreuzwerker/terraform-provider-docker v4.5.0 lacks: their upstream
# source is not on record, so `classify` reports a change to them as a replacement.
UNVERIFIED = {CONTAINER: {"deviceCgroupRules"}}


def sdk_inputs(args_class: type, prefix: str = "") -> set[str]:
    """Every input path (Pulumi names) of an SDK args class, nested args classes included."""
    paths: set[str] = set()
    for attribute in vars(args_class).values():
        name = getattr(getattr(attribute, "fget", None), pulumi_types._PULUMI_NAME, None)
        if name is None:
            continue
        paths.add(prefix + name)
        for nested in re.findall(r"(\w+Args)\b", str(attribute.fget.__annotations__.get("return", ""))):
            paths |= sdk_inputs(getattr(_inputs, nested), f"{prefix}{name}.")
    return paths


@pytest.mark.parametrize("resource_type", sorted(SDK_ARGS))
def test_the_table_knows_every_input_of_the_installed_sdk(resource_type):
    rules = RULES[resource_type]
    unknown = {path for path in sdk_inputs(SDK_ARGS[resource_type]) if not rules.knows(path)}
    assert unknown == UNVERIFIED.get(resource_type, set())


def test_every_replace_forcing_field_is_an_sdk_input():
    for resource_type, rules in RULES.items():
        assert rules.replace <= sdk_inputs(SDK_ARGS[resource_type]), resource_type


def test_plan_records_retain_on_delete_and_delete_before_replace():
    result = CliRunner().invoke(app, ["plan", "prod", "--format", "json"], catch_exceptions=False)
    resources = {r["name"]: r for r in json.loads(result.output)["resources"]}
    volume = resources["prod-artifact-store-artifacts"]
    assert (volume["protect"], volume["retain_on_delete"]) == (True, True)
    assert resources["prod-network"]["delete_before_replace"] is True
    assert resources["prod-model-registry-server"]["delete_before_replace"] is False
