"""What the Docker provider does with a changed input: update the resource in place, or replace it.

A reviewer's first question about an infrastructure change is whether a resource is updated or replaced,
since replacing a container means downtime and replacing a volume deletes its data. Pulumi replaces a
bridged resource when Terraform's plan marks a changed attribute `RequiresNew`, which the schema says with
`ForceNew`. The tables below list, per resource type the stack uses (and the Swarm types to come), every
top-level input and every replace-forcing field below an updatable block, in the camelCase names of a
rendering (`mlops.plan.flatten`).

Provenance. pulumi-docker v5.1.0 bridges kreuzwerker/terraform-provider-docker at its submodule commit
5074970c, tag v4.5.0, unpatched in any schema (its `patches/` add `shim.NewProvider` and a registry TLS
fix). The ForceNew, Optional+Computed and set/list facts come from that tag's Go schema, and agree
field for field with `willReplaceOnChanges` in pulumi-docker v5.1.0
provider/cmd/pulumi-resource-docker/schema.json. The stack pins the pulumi-docker 5.2.0 SDK, whose
container inputs add `deviceCgroupRules` and `uploads.owner`/`uploads.group`, absent from v4.5.0: its
upstream is newer than any source on record here. Fields under `uploads` replace anyway (`upload` is
ForceNew); an input no table lists, like `deviceCgroupRules`, is reported as a replacement, the safe
answer, until its source can be read.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Optional


def _paths(text: str) -> frozenset[str]:
    return frozenset(text.split())


_SEGMENT = re.compile(r"\.?([^.\[\]]+)|\[([^\]]*)\]")


def prefixes(path: str) -> list[tuple[str, str]]:
    """`(field, concrete path)` for each field a flattened path crosses, outermost first: `mounts[2].target`
    gives `("mounts", "mounts[2]"), ("mounts.target", "mounts[2].target")`. List indices stay in the
    concrete path (they name one element); a bracketed key with dots (`labels[mlops.stage]`) ends the walk,
    being a map key."""
    found: list[tuple[str, str]] = []
    for match in _SEGMENT.finditer(path):
        name, bracket = match.groups()
        if name is not None:
            found.append((f"{found[-1][0]}.{name}" if found else name, path[:match.end()]))
        elif bracket.isdigit() and found:
            found[-1] = (found[-1][0], path[:match.end()])
        else:
            break
    return found


def schema_path(path: str) -> str:
    """`taskSpec.containerSpec.mounts[0].target` -> `taskSpec.containerSpec.mounts.target`."""
    found = prefixes(path)
    return found[-1][0] if found else path


@dataclass(frozen=True)
class Rules:
    """One resource type's behaviour on a changed input, as its provider source defines it."""

    # Replace-forcing fields; each covers everything below it (a change to any element of a ForceNew
    # list or set, or to a field nested in a ForceNew block, replaces).
    replace: frozenset[str]
    # Top-level inputs that update in place (fields below them update too, unless listed in `replace`).
    update: frozenset[str]
    # Blocks that are not ForceNew but hold replace-forcing fields, and replace in more cases than a
    # changed ForceNew leaf: "set" (Terraform identifies a set element by its whole content, so any
    # change removes the old element and adds a new one; that replaces when either holds a value in a
    # replace-forcing field) and "defaulted" (replace-forcing fields with defaults: adding or removing
    # the block changes them).
    blocks: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # Optional+Computed fields (or fields whose diff is suppressed when empty): removing one from the
    # program keeps the value the provider has, so it changes nothing.
    keep_when_unset: frozenset[str] = frozenset()
    # Fields the provider's diff skips: changing them alone is no change at all.
    ignored: frozenset[str] = frozenset()
    # What a reviewer should know about a field beyond update/replace.
    notes: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    # The provider asks Pulumi to delete the old resource before creating its replacement.
    delete_before_replace: bool = False
    # The engine refuses to create a second object of a name that exists, so a replacement of the same `name`
    # created before the old one is deleted fails `pulumi up` (Docker volumes are the exception: a create of
    # an existing name hands back the existing volume; image tags just move).
    unique_name: bool = False

    @property
    def inputs(self) -> frozenset[str]:
        return self.update | {path.split(".")[0] for path in self.replace}

    def knows(self, path: str) -> bool:
        found = prefixes(path)
        return bool(found) and found[0][0] in self.inputs

    def forcing_field(self, path: str) -> Optional[str]:
        """The replace-forcing field at or above `path` (flattened, indices allowed), if any."""
        return next((field for field, _ in prefixes(path) if field in self.replace), None)

    def note(self, path: str) -> Optional[str]:
        return next((self.notes[field] for field, _ in prefixes(path) if field in self.notes), None)

    def is_ignored(self, path: str) -> bool:
        return schema_path(path) in self.ignored


# kreuzwerker/terraform-provider-docker v4.5.0 internal/provider/resource_docker_container.go (schema);
# the in-place update is resourceDockerContainerUpdate in resource_docker_container_funcs.go, and
# pulumi-docker v5.1.0 provider/resources.go sets `DeleteBeforeReplace: true` for docker_container.
_CONTAINER_RECORDED_ONLY = (
    "recorded in Pulumi's state only: the provider's update (resourceDockerContainerUpdate) applies just "
    "restart, maxRetryCount, cpuShares, cpuSet, memory, memoryReservation, memorySwap and the device "
    "I/O limits, so the running container keeps its old value until it is next created")
CONTAINER = Rules(
    replace=_paths("""
        capabilities cgroupParent cgroupnsMode command cpus deviceRequests devices dns dnsOpts dnsSearches
        domainname entrypoints envs gpus groupAdds hostname hosts image ipcMode labels logDriver logOpts
        mounts name networkMode networksAdvanced pidMode platform ports privileged publishAllPorts readOnly
        runtime securityOpts shmSize stdinOpen stopSignal stopTimeout storageOpts sysctls tty ulimits
        uploads user usernsMode volumes workingDir
    """),
    update=_paths("""
        attach containerReadRefreshTimeoutMilliseconds cpuPeriod cpuQuota cpuSet cpuShares
        destroyGraceSeconds deviceReadBps deviceReadIops deviceWriteBps deviceWriteIops healthcheck init
        logs maxRetryCount memory memoryReservation memorySwap mustRun removeVolumes restart rm start tmpfs
        wait waitTimeout
    """),
    # `user` and `workingDir` are not Computed, but their DiffSuppressFunc treats an empty value as no change.
    # (`ports` has one too, for a reorder of the same ports; renderings keep one order, so it never shows.)
    keep_when_unset=_paths("""
        command entrypoints envs healthcheck hostname init ipcMode labels logDriver platform ports.external
        runtime securityOpts shmSize stopSignal stopTimeout user workingDir
    """),
    notes=MappingProxyType({name: _CONTAINER_RECORDED_ONLY for name in _paths("""
        attach containerReadRefreshTimeoutMilliseconds cpuPeriod cpuQuota destroyGraceSeconds healthcheck
        init logs removeVolumes rm start tmpfs wait waitTimeout
    """)}),
    delete_before_replace=True,
    unique_name=True,
)

# kreuzwerker/terraform-provider-docker v4.5.0 internal/provider/resource_docker_volume.go: its update
# changes only `cluster.availability` of a Swarm cluster volume; everything a local volume has replaces.
VOLUME = Rules(
    replace=_paths("""
        driver driverOpts labels name cluster.group cluster.limitBytes cluster.requiredBytes cluster.scope
        cluster.sharing cluster.topologyPreferred cluster.topologyRequired cluster.type
    """),
    update=_paths("cluster"),
    blocks=MappingProxyType({"cluster": "defaulted"}),  # scope "single", sharing "none", type "block"
    keep_when_unset=_paths("driver name"),
)

# kreuzwerker/terraform-provider-docker v4.5.0 internal/provider/resource_docker_network.go: no update
# function at all, so every input replaces. Its create sends no CheckDuplicate, and engines from API 1.44 on
# refuse a duplicate name anyway: counted as unique.
NETWORK = Rules(
    replace=_paths("attachable driver ingress internal ipamConfigs ipamDriver ipamOptions ipv6 labels name options"),
    update=frozenset(),
    keep_when_unset=_paths("driver internal ipamConfigs options"),
    unique_name=True,
)

# kreuzwerker/terraform-provider-docker v4.5.0 internal/provider/resource_docker_image.go (`docker_image`,
# which pulumi-docker maps to RemoteImage). `build` is a one-element set, and `build.context` is required
# and ForceNew, so any change inside `build` replaces.
REMOTE_IMAGE = Rules(
    replace=_paths("""
        name platform pullTriggers triggers build.additionalContexts build.buildArgs build.buildId
        build.buildLogFile build.builder build.cacheFroms build.cacheTos build.cgroupParent build.context
        build.cpuPeriod build.cpuQuota build.cpuSetCpus build.cpuSetMems build.cpuShares build.dockerfile
        build.extraHosts build.forceRemove build.isolation build.labels build.memory build.memorySwap
        build.networkMode build.noCache build.platform build.provenance build.pullParent build.remoteContext
        build.sbom build.secrets.env build.secrets.id build.secrets.src build.securityOpts build.sessionId
        build.shmSize build.squash build.suppressOutput build.target build.ulimits.hard build.ulimits.name
        build.ulimits.soft build.useLegacyBuilder build.version
    """),
    update=_paths("build forceRemove keepLocally"),
    blocks=MappingProxyType({"build": "set"}),
)

# pulumi-docker v5.1.0 provider/image.go and provider/provider.go (`dockerNativeProvider.Diff`): the
# native Image resource never asks for a replacement; an update rebuilds and pushes. Its `diffUpdates`
# registers a change of `registry` only when `registry.server` changes.
IMAGE = Rules(
    replace=frozenset(),
    update=_paths("build buildOnPreview imageName registry skipPush"),
    ignored=_paths("registry.username registry.password"),
)

# The provider resource. pulumi-docker v5.1.0 provider/hybrid.go hands DiffConfig to the bridged provider:
# pulumi-terraform-bridge v3.133.0 pkg/tfbridge/provider.go (configDiffer.DiffConfig) replaces a provider
# only for config fields marked `ForcesProviderReplace`, and pulumi-docker v5.1.0 provider/resources.go
# marks none (its `host` and `registry_auth` entries set only defaults and naming). A replaced provider
# would replace every resource it manages; an updated one keeps its ID, so nothing else changes.
_RETARGETS = ("the provider is updated in place: the resources it manages are not recreated on the new "
              "daemon, Pulumi only sends their later updates and deletes there")
PROVIDER = Rules(
    replace=frozenset(),
    update=_paths("caMaterial certMaterial certPath context disableDockerDaemonCheck host keyMaterial "
                  "registryAuth sshOpts"),
    notes=MappingProxyType({"host": _RETARGETS, "context": _RETARGETS, "sshOpts": _RETARGETS}),
)

# kreuzwerker/terraform-provider-docker v4.5.0 internal/provider/resource_docker_service.go, whose ForceNew
# fields are `auth` (and its three fields), `name`, `mode`, `task_spec.container_spec.labels` and the volume
# labels of `mounts` (both `labelSchema`, helpers.go: ForceNew), `hosts`, `sysctl`, and every field of
# `task_spec.networks_advanced`; `placement.platforms` is not, so declaring the stage's platform updates in
# place. pulumi-docker v5.1.0 provider/resources.go sets no DeleteBeforeReplace for docker_service, and Swarm
# refuses a second service of a name: the program asks for delete-before-replace itself (components/runtimes.py),
# and `mlops diff` flags a replacement that would collide. `mode` is a ForceNew list of one block, and ForceNew on a list covers its length and its direct elements' fields, not
# fields further down (terraform-plugin-sdk v2 schemaMap.diffList gives the count `mode.#` the list's
# ForceNew and diffs each nested field by its own schema; pulumi-terraform-bridge v3.133.0
# pkg/tfbridge/property_path.go `propertyPathTriggersReplacement` mirrors that): switching between global and
# replicated replaces the service, scaling `mode.replicated.replicas` updates it in place.
SERVICE = Rules(
    replace=_paths("""
        auth mode.global name taskSpec.containerSpec.hosts taskSpec.containerSpec.labels.label
        taskSpec.containerSpec.labels.value taskSpec.containerSpec.mounts.volumeOptions.labels.label
        taskSpec.containerSpec.mounts.volumeOptions.labels.value taskSpec.containerSpec.sysctl
        taskSpec.networksAdvanceds.aliases taskSpec.networksAdvanceds.driverOpts taskSpec.networksAdvanceds.id
        taskSpec.networksAdvanceds.name
    """),
    update=_paths("convergeConfig endpointSpec labels mode rollbackConfig taskSpec updateConfig"),
    blocks=MappingProxyType({**{name: "set" for name in _paths("""
        taskSpec.containerSpec.labels taskSpec.containerSpec.mounts
        taskSpec.containerSpec.mounts.volumeOptions.labels taskSpec.networksAdvanceds
    """)}, "mode.replicated": "defaulted"}),
    keep_when_unset=_paths("""
        endpointSpec endpointSpec.mode endpointSpec.ports.publishedPort labels mode mode.replicated
        taskSpec.containerSpec.dnsConfig taskSpec.containerSpec.healthcheck taskSpec.containerSpec.init
        taskSpec.containerSpec.stopGracePeriod taskSpec.forceUpdate taskSpec.placement taskSpec.resources
        taskSpec.restartPolicy taskSpec.runtime
    """),
    unique_name=True,
)

# kreuzwerker/terraform-provider-docker v4.5.0 internal/provider/resource_docker_secret.go: no update
# function, every input replaces.
SECRET = Rules(
    replace=_paths("data labels name"),
    update=frozenset(),
    unique_name=True,
)

# kreuzwerker/terraform-provider-docker v4.5.0 internal/provider/resource_docker_config.go (`docker_config`,
# which pulumi-docker maps to ServiceConfig): no update function, every input replaces.
SERVICE_CONFIG = Rules(
    replace=_paths("data dataRaw labels name"),
    update=frozenset(),
    unique_name=True,
)

RULES: Mapping[str, Rules] = MappingProxyType({
    "docker:index/container:Container": CONTAINER,
    "docker:index/volume:Volume": VOLUME,
    "docker:index/network:Network": NETWORK,
    "docker:index/remoteImage:RemoteImage": REMOTE_IMAGE,
    "docker:index/image:Image": IMAGE,
    "pulumi:providers:docker": PROVIDER,
    "docker:index/service:Service": SERVICE,
    "docker:index/secret:Secret": SECRET,
    "docker:index/serviceConfig:ServiceConfig": SERVICE_CONFIG,
})

VOLUME_TYPE = "docker:index/volume:Volume"
