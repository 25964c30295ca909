"""tests/readback.py on recorded inspect answers: each rule of the provider's Read it encodes, and the difference it
reports for a field the engine keeps in another form than the program declares. The engine tests
(tests/test_status.py, tests/test_swarm_cluster.py) run it on the live objects of a deployed stage."""
from __future__ import annotations

import base64

import pytest

from components import runtimes
from components.engine_facts import NO_ENGINE, Engine, NoEngine
from mlops import plan
from mlops_spec.encoding import parse_cpus
from mlops_spec.loading import load_stage
from mlops_spec.project import ENVIRONMENTS_DIR
from tests import readback
from tests.engine import (
    CONTAINER,
    MIB,
    NETWORK,
    SECRET,
    SERVICE,
    SERVICE_CONFIG,
    VOLUME,
    _megabytes_or_unlimited,
    _nanoseconds,
    _service_spec,
)
from tests.readback import Difference, go_duration, short_duration, stored

SECOND = 1_000_000_000
LABELS = [{"label": "mlops.stack", "value": "dev"}, {"label": "mlops.component", "value": "serving"}]


def container_inspect(**host_config) -> dict:
    """A running container as the engine answers GET /containers/{id}/json, trimmed to what Read looks at."""
    return {
        "Name": "/dev-gateway", "Image": "sha256:" + "a" * 64, "State": {"Running": True},
        "Config": {"Image": "sha256:" + "a" * 64, "User": "10001:10001", "Cmd": None, "Labels": {"from": "image"},
                   "Env": ["PATH=/usr/bin", "GATEWAY_MODELS=[]"],
                   "Healthcheck": {"Test": ["CMD", "true"], "Interval": 5 * SECOND, "Timeout": 3 * SECOND,
                                   "StartPeriod": 90 * SECOND, "Retries": 3}},
        "HostConfig": {"ReadonlyRootfs": True, "SecurityOpt": ["no-new-privileges:true"],
                       "RestartPolicy": {"Name": "unless-stopped", "MaximumRetryCount": 0},
                       "CapAdd": None, "CapDrop": ["ALL"], "Tmpfs": {"/tmp": "rw,noexec,nosuid,size=64m"},
                       "IpcMode": "none", "Memory": 128 * MIB, "MemorySwap": 128 * MIB, "NanoCpus": SECOND // 2,
                       "Ulimits": [{"Name": "nproc", "Soft": 4096, "Hard": 4096}], **host_config},
        "NetworkSettings": {"Ports": {"8080/tcp": [{"HostIp": "127.0.0.1", "HostPort": "8080"}], "9090/tcp": None}},
    }


DECLARED_CONTAINER = {
    "name": "dev-gateway", "image": "sha256:" + "a" * 64, "user": "10001:10001", "readOnly": True,
    "securityOpts": ["no-new-privileges:true"], "restart": "unless-stopped", "capabilities": {"drops": ["ALL"]},
    "tmpfs": {"/tmp": "rw,noexec,nosuid,size=64m"}, "ipcMode": "none", "memory": 128, "memorySwap": 128,
    "cpus": "0.5", "ulimits": [{"name": "nproc", "soft": 4096, "hard": 4096}],
    "ports": [{"internal": 8080, "external": 8080, "ip": "127.0.0.1"}],
    "healthcheck": {"tests": ["CMD", "true"], "interval": "5s", "timeout": "3s", "startPeriod": "1m30s", "retries": 3},
    "envs": ["GATEWAY_MODELS=[]"], "labels": LABELS, "wait": True, "waitTimeout": 82,
    "networksAdvanced": [{"name": "dev-net", "aliases": ["gateway"]}],
}


def differences(resource_type: str, inspect: dict, declared: dict) -> list[Difference]:
    return readback.compare(resource_type, "r", declared, stored(resource_type, inspect, declared))


def test_go_durations_as_the_provider_writes_them():
    # Container health checks: time.Duration.String(); services: shortDur.
    assert [go_duration(n) for n in (0, 999, 1_500, 750_000_000, 1_500_000_000, 90 * SECOND, 3600 * SECOND,
                                     3661 * SECOND)] == ["0s", "999ns", "1.5µs", "750ms", "1.5s", "1m30s", "1h0m0s",
                                                         "1h1m1s"]
    assert [short_duration(n * SECOND) for n in (0, 5, 60, 90, 3600, 3660)] == ["0s", "5s", "1m", "1m30s", "1h", "1h1m"]


def test_a_container_read_back_as_declared_shows_no_difference():
    assert differences(CONTAINER, container_inspect(), DECLARED_CONTAINER) == []


def test_container_fields_read_back_in_the_engines_form():
    inspect = container_inspect(MemorySwap=-1, NanoCpus=SECOND)
    declared = {**DECLARED_CONTAINER, "cpus": "1", "healthcheck": {**DECLARED_CONTAINER["healthcheck"], "startPeriod": "90s"}}
    assert differences(CONTAINER, inspect, declared) == [
        # An engine without swap accounting stores -1 whatever it was given; MB otherwise.
        Difference("r", "memorySwap", 128, -1),
        # nanoInt64ToDecimalString: one decimal for a whole number.
        Difference("r", "cpus", "1", "1.0"),
        # Duration.String() writes minutes.
        Difference("r", "healthcheck.startPeriod", "90s", "1m30s"),
    ]


def test_container_fields_read_does_not_set_keep_the_declared_value():
    # Env and labels come partly from the image, so Read leaves them (and volumes, networks, wait) as the state has them.
    read = stored(CONTAINER, container_inspect(), DECLARED_CONTAINER)
    assert (read["envs"], read["labels"], read["networksAdvanced"]) == (
        DECLARED_CONTAINER["envs"], LABELS, DECLARED_CONTAINER["networksAdvanced"])
    # Published ports: one entry per host binding, the protocol added; an exposed port without a binding is none.
    assert read["ports"] == [{"internal": 8080, "external": 8080, "ip": "127.0.0.1", "protocol": "tcp"}]


def test_an_input_the_read_back_does_not_model_fails_rather_than_passing_unchecked():
    with pytest.raises(NotImplementedError, match="shmSize"):
        stored(CONTAINER, container_inspect(), {**DECLARED_CONTAINER, "shmSize": 64})


TMPFS = {"Type": "tmpfs", "Target": "/tmp", "TmpfsOptions": {"SizeBytes": 64 * MIB, "Mode": 0o1777}}
VOLUME_MOUNT = {"Type": "volume", "Source": "cluster-mlflow-db", "Target": "/data/db"}


def service_inspect(mounts=(TMPFS, VOLUME_MOUNT), platforms=({"Architecture": "amd64", "OS": "linux"},)) -> dict:
    """A service as the engine answers GET /services/{id}, trimmed to what Read looks at."""
    return {"Spec": {
        "Name": "cluster-gateway", "Labels": {"mlops.stack": "dev", "mlops.component": "serving"},
        "TaskTemplate": {
            "ContainerSpec": {"Image": "node-1:5301/cluster/gateway@sha256:" + "b" * 64, "User": "10001:10001",
                              "ReadOnly": True, "Env": ["A=1", "URL=http://x/?a=b"], "Mounts": list(mounts),
                              "CapabilityDrop": ["ALL"],
                              "Healthcheck": {"Test": ["CMD", "true"], "Interval": 5 * SECOND, "Timeout": 3 * SECOND,
                                              "StartPeriod": 60 * SECOND, "Retries": 3},
                              "Secrets": [{"SecretID": "s1", "SecretName": "cluster-reader-0a1b",
                                           "File": {"Name": "/run/secrets/reader", "UID": "10001", "GID": "10001",
                                                    "Mode": 0o400}}]},
            "Resources": {"Limits": {"NanoCPUs": SECOND // 2, "MemoryBytes": 128 * MIB},
                          "Reservations": {"NanoCPUs": 0, "MemoryBytes": 0}},
            "RestartPolicy": {"Condition": "any", "Delay": 5 * SECOND, "MaxAttempts": 0, "Window": 0},
            "Placement": {"Constraints": ["node.labels.mlops.edge == true"], "Platforms": list(platforms)},
            "Networks": [{"Target": "n1"}], "ForceUpdate": 0},
        "Mode": {"Replicated": {"Replicas": 2}},
        "UpdateConfig": {"Parallelism": 1, "Delay": 0, "FailureAction": "rollback", "Monitor": 60 * SECOND,
                         "MaxFailureRatio": 0, "Order": "start-first"},
        "EndpointSpec": {"Mode": "dnsrr"}},
        "Endpoint": {"Spec": {"Mode": "dnsrr", "Ports": [{"Protocol": "tcp", "TargetPort": 8080, "PublishedPort": 8380,
                                                           "PublishMode": "host"}]},
                     "Ports": [{"Protocol": "tcp", "TargetPort": 8080, "PublishedPort": 8380, "PublishMode": "host"}]}}


def declared_service(tmpfs_mode: int) -> dict:
    return {
        "name": "cluster-gateway", "labels": list(reversed(LABELS)),
        "mode": {"replicated": {"replicas": 2}},
        "taskSpec": {
            "containerSpec": {
                "image": "node-1:5301/cluster/gateway@sha256:" + "b" * 64, "user": "10001:10001", "readOnly": True,
                "env": {"A": "1", "URL": "http://x/?a=b"}, "capDrops": ["ALL"],
                # A set: the declared order is not the engine's.
                "mounts": [{"target": "/data/db", "type": "volume", "source": "cluster-mlflow-db"},
                           {"target": "/tmp", "type": "tmpfs", "tmpfsOptions": {"sizeBytes": 64 * MIB, "mode": tmpfs_mode}}],
                "healthcheck": {"tests": ["CMD", "true"], "interval": "5s", "timeout": "3s", "startPeriod": "1m",
                                "retries": 3},
                "secrets": [{"secretId": "s1", "secretName": "cluster-reader-0a1b", "fileName": "/run/secrets/reader",
                             "fileUid": "10001", "fileGid": "10001", "fileMode": 0o400}]},
            "resources": {"limits": {"nanoCpus": SECOND // 2, "memoryBytes": 128 * MIB},
                          "reservation": {"nanoCpus": 0, "memoryBytes": 0}},
            "restartPolicy": {"condition": "any", "delay": "5s", "maxAttempts": 0, "window": "0s"},
            "placement": {"constraints": ["node.labels.mlops.edge == true"],
                          "platforms": [{"architecture": "amd64", "os": "linux"}]},
            "networksAdvanceds": [{"id": "n1"}]},
        "endpointSpec": {"mode": "dnsrr", "ports": [{"targetPort": 8080, "publishedPort": 8380, "publishMode": "host",
                                                     "protocol": "tcp"}]},
        "updateConfig": {"parallelism": 1, "delay": "0s", "failureAction": "rollback", "monitor": "1m",
                         "maxFailureRatio": "0.0", "order": "start-first"},
        "convergeConfig": {"delay": "7s", "timeout": "5m"},
    }


def test_a_service_read_back_as_declared_shows_no_difference():
    assert differences(SERVICE, service_inspect(), declared_service(tmpfs_mode=0o777)) == []


def test_a_tmpfs_mode_with_the_sticky_bit_is_read_back_without_it():
    """The old bug: 0o1777 rendered, `Mode.Perm()` read back (flattenServiceMounts); `mounts` being a set, the
    element no longer matches and the service is updated on every `pulumi up`."""
    [difference] = differences(SERVICE, service_inspect(), declared_service(tmpfs_mode=0o1777))
    assert difference.field == "taskSpec.containerSpec.mounts"
    assert difference.declared == [{"target": "/tmp", "type": "tmpfs", "tmpfsOptions": {"sizeBytes": 64 * MIB,
                                                                                          "mode": 0o1777}}]
    assert [mount["tmpfsOptions"]["mode"] for mount in difference.read_back] == [0o777]


def test_platforms_swarm_wrote_for_a_multi_platform_image_are_a_difference():
    """The Docker client's QueryRegistry replaces the placement's platforms with every platform the image's
    manifest list names; flattenPlacementPlatforms reads them all back."""
    inspect = service_inspect(platforms=({"Architecture": "amd64", "OS": "linux"}, {"Architecture": "arm64", "OS": "linux"}))
    assert differences(SERVICE, inspect, declared_service(tmpfs_mode=0o777)) == [
        Difference("r", "taskSpec.placement.platforms", [], [{"architecture": "arm64", "os": "linux"}])]


def test_service_durations_read_back_in_short_form():
    declared = declared_service(tmpfs_mode=0o777)
    declared["updateConfig"] = {**declared["updateConfig"], "monitor": "1m0s", "maxFailureRatio": "0"}
    assert differences(SERVICE, service_inspect(), declared) == [
        Difference("r", "updateConfig.monitor", "1m0s", "1m"), Difference("r", "updateConfig.maxFailureRatio", "0", "0.0")]


def test_volumes_networks_secrets_and_configs():
    assert differences(VOLUME, {"Name": "dev-artifacts", "Driver": "local", "Labels": {"mlops.stack": "dev"}},
                       {"name": "dev-artifacts", "labels": [{"label": "mlops.stack", "value": "dev"}]}) == []
    assert differences(NETWORK, {"Name": "cluster-net", "Driver": "overlay", "Attachable": True, "Scope": "swarm",
                                 "Labels": {}}, {"name": "cluster-net", "driver": "overlay", "attachable": True,
                                                 "labels": LABELS}) == [Difference("r", "labels", LABELS, [])]
    # A secret's data is never read (the API does not give it out), nor are its labels.
    assert differences(SECRET, {"Spec": {"Name": "cluster-reader-0a1b"}},
                       {"name": "cluster-reader-0a1b", "data": "c2VjcmV0", "labels": LABELS}) == []
    data = base64.b64encode(b"scrape_configs: []").decode()
    assert differences(SERVICE_CONFIG, {"Spec": {"Name": "c", "Data": data}}, {"name": "c", "data": data}) == []


class EngineWithoutSwapAccounting(NoEngine):
    def limits_swap(self) -> bool:
        return False


def rendered(stack: str, resource_type: str, engine: Engine = NO_ENGINE) -> list[plan.PlannedResource]:
    return [resource for resource in plan.render(stack, load_stage(stack, ENVIRONMENTS_DIR),
                                                 config={"mlops:registryPassword": "r", "mlops:mlflowPassword": "m"},
                                                 reveal_secrets=True, engines=lambda spec: engine)
            if resource.type == resource_type]


def rendered_services(stack: str) -> list[plan.PlannedResource]:
    return rendered(stack, SERVICE)


def emulated_container(inputs: dict) -> dict:
    """The engine's inspect answer for a container tests/engine.py creates from `inputs` (StageOnEngine._run), with
    the emulator's own conversions of memory, swap, CPUs and durations."""
    if not inputs.get("start", True):
        # Created, never started: the engine's defaults but for what the writer of secret files declares.
        return {"Name": "/" + inputs["name"], "Image": inputs["image"], "State": {"Running": False, "ExitCode": 0},
                "Config": {"Image": inputs["image"], "User": inputs["user"], "Cmd": None},
                "HostConfig": {"ReadonlyRootfs": False, "NetworkMode": inputs["networkMode"],
                               "SecurityOpt": inputs["securityOpts"], "CapDrop": inputs["capabilities"]["drops"],
                               "IpcMode": inputs["ipcMode"], "RestartPolicy": {"Name": "no"}, "Memory": 0,
                               "MemorySwap": 0}}
    check = inputs["healthcheck"]
    return {
        "Name": "/" + inputs["name"], "Image": inputs["image"], "State": {"Running": True},
        "Config": {"Image": inputs["image"], "User": inputs["user"], "Cmd": inputs.get("command"),
                   "Healthcheck": {"Test": check["tests"], "Retries": check["retries"],
                                   **{field: _nanoseconds(check[key]) for key, field in (
                                       ("interval", "Interval"), ("timeout", "Timeout"), ("startPeriod", "StartPeriod"))}}},
        "HostConfig": {"ReadonlyRootfs": inputs["readOnly"], "SecurityOpt": inputs["securityOpts"],
                       "RestartPolicy": {"Name": inputs["restart"]}, "CapDrop": inputs["capabilities"].get("drops"),
                       "CapAdd": inputs["capabilities"].get("adds"), "Tmpfs": inputs.get("tmpfs"),
                       "IpcMode": inputs["ipcMode"], "Memory": inputs["memory"] * MIB,
                       "MemorySwap": _megabytes_or_unlimited(inputs["memorySwap"]), "NanoCpus": parse_cpus(inputs["cpus"]),
                       "Ulimits": [{"Name": limit["name"], "Soft": limit["soft"], "Hard": limit["hard"]}
                                   for limit in inputs.get("ulimits", [])]},
        "NetworkSettings": {"Ports": {f"{port['internal']}/tcp": [{"HostIp": port["ip"], "HostPort": str(port["external"])}]
                                      for port in inputs.get("ports", [])}},
    }


@pytest.mark.parametrize("engine", [NO_ENGINE, EngineWithoutSwapAccounting()], ids=["swap-limited", "swap-unlimited"])
def test_the_emulators_containers_read_back_as_the_dev_stage_renders_them(engine):
    containers = rendered("dev", CONTAINER, engine)
    assert containers and [difference for container in containers for difference in readback.compare(
        CONTAINER, container.name, container.inputs,
        stored(CONTAINER, emulated_container(container.inputs), container.inputs))] == []


def emulated_read_back(resource: plan.PlannedResource) -> list[Difference]:
    """The service tests/engine.py would create for `resource`, read back: the emulator's create and the module's
    Read taken together give back the rendering."""
    inspect = {"Spec": _service_spec(resource.inputs)}
    return readback.compare(SERVICE, resource.name, resource.inputs, stored(SERVICE, inspect, resource.inputs))


def test_the_emulators_services_read_back_as_the_cluster_stage_renders_them():
    services = rendered_services("cluster")
    assert services and [difference for service in services for difference in emulated_read_back(service)] == []


def test_a_cluster_stage_rendering_the_sticky_tmpfs_mode_differs_on_every_service(monkeypatch):
    monkeypatch.setattr(runtimes, "TMP_MODE", 0o1777)
    services = rendered_services("cluster")
    assert {(difference.resource, difference.field) for service in services for difference in emulated_read_back(service)} \
        == {(service.name, "taskSpec.containerSpec.mounts") for service in services}


class RecordedEngine:
    """A StageOnEngine's state with an engine that answers inspects from recorded answers, by object ID."""

    def __init__(self, state: dict, answers: dict[str, dict]) -> None:
        self.state = state
        self.client = self
        self.api = self
        self.inspect_container = self.inspect_service = self.inspect_volume = answers.__getitem__


def test_differences_reads_each_object_in_the_state_by_its_id_and_compares_with_its_inputs():
    from tests.engine import Created

    engine = RecordedEngine(
        {"dev-gateway": Created(CONTAINER, DECLARED_CONTAINER, "c1"),
         "cluster-gateway": Created(SERVICE, declared_service(tmpfs_mode=0o1777), "s1"),
         "dev-artifacts": Created(VOLUME, {"name": "dev-artifacts"}, "dev-artifacts"),
         "dev-image": Created("docker:index/image:Image", {"imageName": "x"}, "sha256:" + "c" * 64)},
        {"c1": container_inspect(MemorySwap=-1), "s1": service_inspect(), "dev-artifacts": {"Name": "dev-artifacts"}})
    assert [(difference.resource, difference.field) for difference in readback.differences(engine)] == [
        ("dev-gateway", "memorySwap"), ("cluster-gateway", "taskSpec.containerSpec.mounts")]
