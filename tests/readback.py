"""Read-back conformance: what the Docker provider's Read would store for each object a stage made on the engine,
compared with what the rendering declared.

`pulumi up` ends every create and update with the provider's Read, and `pulumi up` after it diffs the program's
inputs against what Read stored. A field the engine keeps in another form than the program declares it (a
duration, a mode, a swap limit, a list Swarm fills in) is a change on every `pulumi up`, an in-place update or,
for a ForceNew field, a replacement. tests/engine.py keeps the inputs as rendered, so its second deploy can only
show that the rendering is deterministic; `differences` reads the live objects back as
kreuzwerker/terraform-provider-docker v4.5.0 (bridged by pulumi-docker 5.x) does, and returns every declared field
whose read-back value differs.

Each reader maps an engine inspect answer to the provider's state in the camelCase names of a rendering, field by
field, citing the provider function it follows (internal/provider/ at tag v4.5.0). A field Read does not set keeps
the value the state had, which is the declared one: those are listed per type and taken from the declaration.
Comparison: only the fields the program sets count (so fields the provider fills from the engine when unset,
Optional+Computed, never do); a field missing from a block Read sets is its zero value (the plugin SDK writes a
whole block); set-typed fields compare as sets, each declared element matching a read-back element on the fields
it sets, and an extra read-back element is a difference too.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from mlops.replacements import RULES, schema_path
from mlops_spec.encoding import nano_text
from tests.engine import CONTAINER, MIB, NETWORK, SECRET, SERVICE, SERVICE_CONFIG, VOLUME

_SET_BLOCKS = {resource_type: {path for path, kind in rules.blocks.items() if kind == "set"}
               for resource_type, rules in RULES.items()}
"""The set-typed blocks mlops/replacements.py lists already (those holding ForceNew fields); SETS adds the rest."""
SETS: Mapping[str, frozenset[str]] = {
    # resource_docker_container.go: TypeSet fields (`ulimit` is `ulimits` in Pulumi's names).
    CONTAINER: frozenset({"capabilities.adds", "capabilities.drops", "envs", "labels", "networksAdvanced",
                          "networksAdvanced.aliases", "securityOpts", "ulimits", "volumes", "mounts"}),
    # resource_docker_service.go: TypeSet fields.
    SERVICE: frozenset(_SET_BLOCKS[SERVICE] | {
        "labels", "taskSpec.containerSpec.secrets", "taskSpec.containerSpec.configs", "taskSpec.containerSpec.hosts",
        "taskSpec.placement.constraints", "taskSpec.placement.prefs", "taskSpec.placement.platforms",
        "taskSpec.networksAdvanceds.aliases", "taskSpec.networksAdvanceds.driverOpts"}),
    # resource_docker_volume.go, resource_docker_network.go, resource_docker_secret.go, resource_docker_config.go.
    VOLUME: frozenset({"labels"}),
    NETWORK: frozenset({"labels", "ipamConfigs"}),
    SECRET: frozenset({"labels"}),
    SERVICE_CONFIG: frozenset({"labels"}),
}

FROM_STATE: Mapping[str, frozenset[str]] = {
    # resourceDockerContainerRead: "We decided not to set the environment variables and labels"; `volumes` is never
    # set, `networks_advanced` only when the state has none (an import); `wait` and `wait_timeout` are create
    # options. `capabilities` is set only when the container adds or drops one, `cpus` only when it has a CPU limit,
    # `healthcheck` only when it has one, `ulimit` and `ports` only when the state has them. "upload can't be
    # imported", nor can `start`; `must_run` is set (to false) only for a stopped container declared with true.
    CONTAINER: frozenset({"envs", "labels", "volumes", "networksAdvanced", "wait", "waitTimeout",
                          "capabilities", "cpus", "healthcheck", "ulimits", "ports", "uploads", "start", "mustRun"}),
    # resourceDockerServiceReadRefreshFunc sets no `converge_config` (a create and update option) and no `auth`.
    SERVICE: frozenset({"convergeConfig", "auth"}),
    # resourceDockerSecretRead sets `name` only: "secret data is not exposed via the API", and labels are kept.
    SECRET: frozenset({"data", "labels"}),
    VOLUME: frozenset(),
    NETWORK: frozenset(),
    SERVICE_CONFIG: frozenset(),
}
"""Fields Read does not set, or sets only in some cases: otherwise the state keeps the value it had."""


@dataclass(frozen=True)
class Difference:
    resource: str
    field: str
    """The flattened input path (`healthcheck.interval`, `taskSpec.containerSpec.mounts`)."""
    declared: Any
    read_back: Any


def go_duration(nanoseconds: int) -> str:
    """Go's time.Duration.String(): "0s", "750ms", "1.5s", "1m0s", "1h0m0s"."""
    if nanoseconds == 0:
        return "0s"
    sign, rest = ("-" if nanoseconds < 0 else ""), abs(nanoseconds)
    if rest < 1_000:
        return f"{sign}{rest}ns"
    for digits, unit in ((3, "µs"), (6, "ms")):
        if rest < 1_000 * 10 ** digits:
            whole, fraction = _fraction(rest, digits)
            return f"{sign}{whole}{fraction}{unit}"
    seconds, fraction = _fraction(rest, 9)
    text = f"{seconds % 60}{fraction}s"
    minutes = seconds // 60
    if minutes:
        text = f"{minutes % 60}m{text}"
        if minutes // 60:
            text = f"{minutes // 60}h{text}"
    return sign + text


def _fraction(value: int, digits: int) -> tuple[int, str]:
    """Go's fmtFrac: the whole part and the fraction of `value` / 10**digits, trailing zeros cut."""
    whole, fraction = divmod(value, 10 ** digits)
    text = f"{fraction:0{digits}d}".rstrip("0")
    return whole, f".{text}" if text else ""


def short_duration(nanoseconds: int) -> str:
    """resource_docker_service_structures.go shortDur: Go's form, then "1m0s" -> "1m" and "1h0m" -> "1h"."""
    text = go_duration(nanoseconds)
    if text.endswith("m0s"):
        text = text[:-2]
    return text[:-2] if text.endswith("h0m") else text


def label_set(labels: Mapping[str, str] | None) -> list[dict[str, str]]:
    """helpers.go mapToLabelSet: a label map as the set of {label, value} blocks."""
    return [{"label": key, "value": value} for key, value in (labels or {}).items()]


# -- containers: resource_docker_container_funcs.go resourceDockerContainerRead ---------------------------------

def read_container(inspect: Mapping[str, Any], state: Mapping[str, Any]) -> dict[str, Any]:
    config, host = inspect["Config"], inspect["HostConfig"]
    read: dict[str, Any] = {
        # d.Set("name", strings.TrimLeft(container.Name, "/"))
        "name": inspect["Name"].lstrip("/"),
        "readOnly": host.get("ReadonlyRootfs", False),
        # An image declared by ID ("sha256:...") is read back as the ID the container runs, else as Config.Image.
        "image": inspect["Image"] if str(state.get("image", "")).startswith("sha256:") else config.get("Image"),
        "command": config.get("Cmd") or [],
        "user": config.get("User", ""),
        "securityOpts": host.get("SecurityOpt") or [],
        "restart": (host.get("RestartPolicy") or {}).get("Name", ""),
        "tmpfs": host.get("Tmpfs") or {},
        "ipcMode": host.get("IpcMode", ""),
        "networkMode": host.get("NetworkMode", ""),
        # memory: HostConfig.Memory/1024/1024; memory_swap: in MB when positive, else as is (-1: unlimited, which an
        # engine without swap accounting stores whatever it was given).
        "memory": host.get("Memory", 0) // MIB,
        "memorySwap": host.get("MemorySwap", 0) // MIB if host.get("MemorySwap", 0) > 0 else host.get("MemorySwap", 0),
    }
    # capabilities: set only when the container adds or drops any; otherwise the state keeps its value.
    if host.get("CapAdd") or host.get("CapDrop"):
        read["capabilities"] = {"adds": host.get("CapAdd") or [], "drops": host.get("CapDrop") or []}
    # cpus: helpers.go nanoInt64ToDecimalString, set only when NanoCPUs > 0.
    if host.get("NanoCpus", 0) > 0:
        read["cpus"] = nano_text(host["NanoCpus"])
    # ulimit: flattenUlimits, only when the state has any.
    if state.get("ulimits"):
        read["ulimits"] = [{"name": limit["Name"], "soft": limit["Soft"], "hard": limit["Hard"]}
                           for limit in host.get("Ulimits") or []]
    # ports: flattenContainerPorts (resource_docker_container_structures.go), when the state has ports and the
    # container runs (or must_run, true by default): one entry per host binding, ordered by port.
    if state.get("ports") and (inspect["State"].get("Running") or state.get("mustRun", True)):
        bindings = (inspect.get("NetworkSettings") or {}).get("Ports") or {}
        read["ports"] = [{"internal": int(port), "external": int(binding["HostPort"] or 0), "ip": binding["HostIp"],
                          "protocol": protocol}
                         for port, protocol in sorted((int(key.split("/")[0]), key.split("/")[1])
                                                      for key in bindings if bindings[key])
                         for binding in bindings[f"{port}/{protocol}"]]
    if not inspect["State"].get("Running") and state.get("mustRun", True):
        read["mustRun"] = False
    # healthcheck: its durations as Go's Duration.String() writes them.
    check = config.get("Healthcheck")
    if check is not None:
        read["healthcheck"] = {"tests": check.get("Test") or [], "retries": check.get("Retries", 0),
                               **{key: go_duration(check.get(field, 0)) for key, field in (
                                   ("interval", "Interval"), ("timeout", "Timeout"), ("startPeriod", "StartPeriod"),
                                   ("startInterval", "StartInterval"))}}
    return read


# -- services: resource_docker_service_funcs.go resourceDockerServiceReadRefreshFunc ------------------------------

def read_service(inspect: Mapping[str, Any], state: Mapping[str, Any]) -> dict[str, Any]:
    spec = inspect["Spec"]
    endpoint = inspect.get("Endpoint") or {}
    # endpoint_spec: flattenServiceEndpoint from the service's Endpoint once it has a mode, else
    # flattenServiceEndpointSpec from the spec.
    endpoint_spec = endpoint["Spec"] if (endpoint.get("Spec") or {}).get("Mode") else spec.get("EndpointSpec") or {}
    ports = endpoint.get("Ports") if (endpoint.get("Spec") or {}).get("Mode") else endpoint_spec.get("Ports")
    read = {
        "name": spec["Name"],
        "labels": label_set(spec.get("Labels")),
        "taskSpec": _task_spec(spec["TaskTemplate"]),
        "mode": _service_mode(spec["Mode"]),
        "endpointSpec": {"mode": endpoint_spec.get("Mode", ""), "ports": [
            {"name": port.get("Name", ""), "protocol": port.get("Protocol", ""), "targetPort": port.get("TargetPort", 0),
             "publishedPort": port.get("PublishedPort", 0), "publishMode": port.get("PublishMode", "")}
            for port in ports or []]},
    }
    for key, field in (("updateConfig", "UpdateConfig"), ("rollbackConfig", "RollbackConfig")):
        # An empty block when the engine has none.
        read[key] = {} if spec.get(field) is None else _update_or_rollback(spec[field])
    return read


def _service_mode(mode: Mapping[str, Any]) -> dict[str, Any]:
    """flattenServiceMode and flattenReplicated."""
    read: dict[str, Any] = {"global": "Global" in mode}
    if "Replicated" in mode:
        replicas = mode["Replicated"].get("Replicas")
        read["replicated"] = {} if replicas is None else {"replicas": replicas}
    return read


def _update_or_rollback(config: Mapping[str, Any]) -> dict[str, Any]:
    """flattenServiceUpdateOrRollbackConfig: durations by shortDur, max_failure_ratio with one decimal
    (strconv.FormatFloat(..., 'f', 1, 64))."""
    return {"parallelism": config.get("Parallelism", 0), "delay": short_duration(config.get("Delay", 0)),
            "failureAction": config.get("FailureAction", ""), "monitor": short_duration(config.get("Monitor", 0)),
            "maxFailureRatio": f"{float(config.get('MaxFailureRatio', 0)):.1f}", "order": config.get("Order", "")}


def _task_spec(task: Mapping[str, Any]) -> dict[str, Any]:
    """resource_docker_service_structures.go flattenTaskSpec."""
    read: dict[str, Any] = {"forceUpdate": task.get("ForceUpdate", 0)}
    if task.get("ContainerSpec") is not None:
        read["containerSpec"] = _container_spec(task["ContainerSpec"])
    if task.get("Resources") is not None:
        # flattenTaskResources, flattenResourceLimits, flattenResourceReservations.
        resources = task["Resources"]
        read["resources"] = {"limits": _resources(resources.get("Limits")),
                             "reservation": _resources(resources.get("Reservations"), generic=True)}
    if task.get("RestartPolicy") is not None:
        # flattenTaskRestartPolicy: each field when the engine has it, durations by shortDur.
        policy = task["RestartPolicy"]
        read["restartPolicy"] = {key: convert(policy[field]) for key, field, convert in (
            ("condition", "Condition", str), ("delay", "Delay", short_duration), ("maxAttempts", "MaxAttempts", int),
            ("window", "Window", short_duration)) if policy.get(field) is not None and policy.get(field) != ""}
    if task.get("Placement") is not None:
        # flattenTaskPlacement: prefs as bare spread descriptors (flattenPlacementPrefs), platforms as the engine
        # holds them (flattenPlacementPlatforms), max_replicas always.
        placement = task["Placement"]
        read["placement"] = {"maxReplicas": placement.get("MaxReplicas", 0)}
        if placement.get("Constraints"):
            read["placement"]["constraints"] = placement["Constraints"]
        if placement.get("Preferences"):
            read["placement"]["prefs"] = [preference["Spread"]["SpreadDescriptor"]
                                          for preference in placement["Preferences"]]
        if placement.get("Platforms"):
            read["placement"]["platforms"] = [{"architecture": platform.get("Architecture", ""),
                                               "os": platform.get("OS", "")} for platform in placement["Platforms"]]
    if task.get("Runtime"):
        read["runtime"] = task["Runtime"]
    if task.get("Networks"):
        # flattenTaskNetworksAdvanced: each attachment by its target, which the engine holds as the network's ID.
        read["networksAdvanceds"] = [
            {"id": network["Target"], "driverOpts": [f"{key}={value}" for key, value in
                                                     (network.get("DriverOpts") or {}).items()],
             **({"aliases": network["Aliases"]} if network.get("Aliases") else {})}
            for network in task["Networks"]]
    if task.get("LogDriver") is not None:
        driver = task["LogDriver"]
        read["logDriver"] = {"name": driver.get("Name", ""), **({"options": driver["Options"]} if driver.get("Options") else {})}
    return read


def _resources(resources: Mapping[str, Any] | None, generic: bool = False) -> dict[str, Any]:
    if resources is None:
        return {}
    read = {"nanoCpus": resources.get("NanoCPUs", 0), "memoryBytes": resources.get("MemoryBytes", 0)}
    if generic and resources.get("GenericResources"):
        # flattenResourceGenericResource: "kind=value" strings.
        items = resources["GenericResources"]
        read["genericResources"] = {
            "namedResourcesSpecs": [f"{item['NamedResourceSpec']['Kind']}={item['NamedResourceSpec']['Value']}"
                                    for item in items if "NamedResourceSpec" in item],
            "discreteResourcesSpecs": [f"{item['DiscreteResourceSpec']['Kind']}={item['DiscreteResourceSpec']['Value']}"
                                       for item in items if "DiscreteResourceSpec" in item]}
    return read


def _container_spec(container: Mapping[str, Any]) -> dict[str, Any]:
    """flattenContainerSpec: each field only when the engine holds a value (`read_only` only when true)."""
    read: dict[str, Any] = {}
    plain = (("image", "Image"), ("commands", "Command"), ("args", "Args"), ("hostname", "Hostname"),
             ("user", "User"), ("dir", "Dir"), ("groups", "Groups"), ("stopSignal", "StopSignal"),
             ("isolation", "Isolation"), ("sysctl", "Sysctls"), ("capAdds", "CapabilityAdd"),
             ("capDrops", "CapabilityDrop"))
    read.update({key: container[field] for key, field in plain if container.get(field)})
    if container.get("Labels"):
        read["labels"] = label_set(container["Labels"])
    if container.get("Env"):
        # mapStringSliceToMap: split at the first "=".
        read["env"] = dict(variable.split("=", 1) if "=" in variable else (variable, "") for variable in container["Env"])
    if container.get("ReadOnly"):
        read["readOnly"] = True
    if container.get("Mounts"):
        read["mounts"] = [_mount(mount) for mount in container["Mounts"]]
    if container.get("StopGracePeriod") is not None:
        read["stopGracePeriod"] = short_duration(container["StopGracePeriod"])
    if container.get("Healthcheck") is not None:
        # flattenServiceHealthcheck: durations by shortDur.
        check = container["Healthcheck"]
        read["healthcheck"] = {"interval": short_duration(check.get("Interval", 0)),
                               "timeout": short_duration(check.get("Timeout", 0)),
                               "startPeriod": short_duration(check.get("StartPeriod", 0)),
                               "retries": check.get("Retries", 0), **({"tests": check["Test"]} if check.get("Test") else {})}
    if container.get("Secrets"):
        read["secrets"] = [_file_reference(secret, "Secret") for secret in container["Secrets"]]
    if container.get("Configs"):
        read["configs"] = [_file_reference(config, "Config") for config in container["Configs"]]
    if container.get("Init") is not None:
        read["init"] = container["Init"]
    return read


def _mount(mount: Mapping[str, Any]) -> dict[str, Any]:
    """flattenServiceMounts: the tmpfs mode as `Mode.Perm()`, the permission bits only (a sticky bit is dropped)."""
    read: dict[str, Any] = {"target": mount.get("Target", ""), "source": mount.get("Source", ""),
                            "type": mount.get("Type", ""), "readOnly": mount.get("ReadOnly", False)}
    if mount.get("BindOptions") is not None:
        propagation = mount["BindOptions"].get("Propagation")
        read["bindOptions"] = {"propagation": propagation} if propagation else {}
    if mount.get("VolumeOptions") is not None:
        options = mount["VolumeOptions"]
        driver = options.get("DriverConfig")
        read["volumeOptions"] = {"noCopy": options.get("NoCopy", False), "labels": label_set(options.get("Labels")),
                                 **({} if driver is None else {"driverOptions": driver.get("Options") or {},
                                                               **({"driverName": driver["Name"]} if driver.get("Name") else {})})}
    if mount.get("TmpfsOptions") is not None:
        tmpfs = mount["TmpfsOptions"]
        read["tmpfsOptions"] = {"sizeBytes": tmpfs.get("SizeBytes", 0), "mode": tmpfs.get("Mode", 0) & 0o777}
    return read


def _file_reference(reference: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """flattenServiceSecrets and flattenServiceConfigs: the name, uid and gid when set, the file mode always."""
    prefix = kind.lower()
    read: dict[str, Any] = {f"{prefix}Id": reference[f"{kind}ID"]}
    if reference.get(f"{kind}Name"):
        read[f"{prefix}Name"] = reference[f"{kind}Name"]
    file = reference.get("File")
    if file is not None:
        read.update({"fileName": file.get("Name", ""), "fileMode": file.get("Mode", 0),
                     **({"fileUid": file["UID"]} if file.get("UID") else {}),
                     **({"fileGid": file["GID"]} if file.get("GID") else {})})
    return read


# -- volumes, networks, secrets, configs -------------------------------------------------------------------------

def read_volume(inspect: Mapping[str, Any], state: Mapping[str, Any]) -> dict[str, Any]:
    """resource_docker_volume.go resourceDockerVolumeRead."""
    return {"name": inspect["Name"], "labels": label_set(inspect.get("Labels")), "driver": inspect.get("Driver", ""),
            "driverOpts": inspect.get("Options") or {}}


def read_network(inspect: Mapping[str, Any], state: Mapping[str, Any]) -> dict[str, Any]:
    """resource_docker_network_funcs.go resourceDockerNetworkReadRefreshFunc (options: an overlay network's only
    when it has any; ipam_config is left to its own flattener, no stage declares it)."""
    ipam = inspect.get("IPAM") or {}
    read = {"name": inspect["Name"], "labels": label_set(inspect.get("Labels")), "driver": inspect.get("Driver", ""),
            "internal": inspect.get("Internal", False), "attachable": inspect.get("Attachable", False),
            "ingress": inspect.get("Ingress", False), "ipv6": inspect.get("EnableIPv6", False),
            "ipamDriver": ipam.get("Driver", ""), "ipamOptions": ipam.get("Options") or {}}
    if inspect.get("Scope") != "overlay" or inspect.get("Options"):
        read["options"] = inspect.get("Options") or {}
    return read


def read_secret(inspect: Mapping[str, Any], state: Mapping[str, Any]) -> dict[str, Any]:
    """resource_docker_secret.go resourceDockerSecretRead: the name only."""
    return {"name": inspect["Spec"]["Name"]}


def read_config(inspect: Mapping[str, Any], state: Mapping[str, Any]) -> dict[str, Any]:
    """resource_docker_config.go resourceDockerConfigRead: `data` base64 again (the engine answers it base64, as
    Go's []byte marshals), or `dataRaw` as text when the state has that."""
    spec = inspect["Spec"]
    data = spec.get("Data", "")
    read = {"name": spec["Name"], "labels": label_set(spec.get("Labels"))}
    if "dataRaw" in state:
        read["dataRaw"] = base64.b64decode(data).decode()
    else:
        read["data"] = data
    return read


READERS: Mapping[str, Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, Any]]] = {
    CONTAINER: read_container, SERVICE: read_service, VOLUME: read_volume, NETWORK: read_network,
    SECRET: read_secret, SERVICE_CONFIG: read_config}


def stored(resource_type: str, inspect: Mapping[str, Any], state: Mapping[str, Any]) -> dict[str, Any]:
    """The state Read leaves for an object the engine answers `inspect` for, whose state was `state`: what Read
    sets, and the state's value of every field it leaves alone."""
    read = READERS[resource_type](inspect, state)
    unmodelled = set(state) - set(read) - FROM_STATE[resource_type]
    if unmodelled:
        raise NotImplementedError(f"{resource_type}: the read-back does not model {sorted(unmodelled)}")
    return {**{key: state[key] for key in FROM_STATE[resource_type] if key in state}, **read}


def compare(resource_type: str, resource: str, declared: Mapping[str, Any], read: Mapping[str, Any]) -> list[Difference]:
    """The declared fields whose read-back value differs."""
    return _compare(SETS[resource_type], resource, "", declared, read)


def _compare(sets: frozenset[str], resource: str, path: str, declared: Any, read: Any) -> list[Difference]:
    if isinstance(declared, Mapping):
        if not isinstance(read, Mapping):
            return [Difference(resource, path, declared, read)]
        return [difference for key, value in declared.items()
                for difference in _compare(sets, resource, f"{path}.{key}" if path else key, value,
                                           read.get(key, _zero(value)))]
    if isinstance(declared, list) and schema_path(path) in sets:
        unmatched = list(read) if isinstance(read, list) else []
        missing = []
        for element in declared:
            match = next((index for index, candidate in enumerate(unmatched)
                          if not _compare(sets, resource, path, element, candidate)), None)
            if match is None:
                missing.append(element)
            else:
                unmatched.pop(match)
        return [Difference(resource, path, missing, unmatched)] if missing or unmatched else []
    if isinstance(declared, list):
        if not isinstance(read, list) or len(read) != len(declared):
            return [Difference(resource, path, declared, read)]
        return [difference for index, (element, candidate) in enumerate(zip(declared, read))
                for difference in _compare(sets, resource, f"{path}[{index}]", element, candidate)]
    return [] if declared == read else [Difference(resource, path, declared, read)]


def _zero(value: Any) -> Any:
    """The value the plugin SDK stores for a field missing from a block Read sets."""
    return type(value)() if isinstance(value, (bool, int, float, str, list, dict)) else None


INSPECTS: Mapping[str, str] = {
    CONTAINER: "inspect_container", SERVICE: "inspect_service", VOLUME: "inspect_volume", NETWORK: "inspect_network",
    SECRET: "inspect_secret", SERVICE_CONFIG: "inspect_config"}
"""The Docker SDK call that answers the engine's inspect of each type, as each Read asks it."""


def differences(engine) -> list[Difference]:
    """Every declared field of every object in `engine`'s state (a tests/engine.py StageOnEngine) whose read-back
    differs from the inputs it was created or updated with."""
    found = []
    for name, entry in engine.state.items():
        if entry.type in READERS:
            read = stored(entry.type, getattr(engine.client.api, INSPECTS[entry.type])(entry.id), entry.inputs)
            found += compare(entry.type, name, entry.inputs, read)
    return found
