"""The two runtimes of the workload contract (components/workload.py): a single Docker host, where each
workload runs as `docker.Container`s, and a Docker Swarm, where it runs as a `docker.Service` and its secrets
as `docker.Secret` files. components/stack.py chooses one per stage; the components never ask which.

Both render their inputs as terraform-provider-docker v4.5.0 reads them back, so a second `pulumi up` shows
no diff: containers (resource_docker_container_funcs.go) with durations in Go's `time.Duration` form
("1m30s"), the swap limit as the engine stores it (`memory_swap`), one nproc ulimit; services
(resource_docker_service_structures.go) with durations in `shortDur` form ("1m", not "1m0s"), `max_failure_ratio`
with one decimal ("0.0"), networks by ID (`flattenTaskNetworksAdvanced` writes back the target ID; a name would
replace the service on every run), placement preferences as bare spread descriptors, the platform the stage
runs as the one placement platform (`flattenPlacementPlatforms`), and every field of the restart policy and the
reservations set (the provider sends the unset ones as zero and reads them back as "0s" and 0).

A service's name is fixed and Swarm refuses a second service of that name, so a change of a field the provider
marks ForceNew (resource_docker_service.go: `name`, `auth`, `mode` between global and replicated, container
labels, `hosts`, `sysctl`, volume labels of mounts, and every field of `networks_advanced`; mlops/replacements.py
lists them) replaces a service delete-before-replace: a replacement created first would fail on its own name.

What a service spec cannot express of the hardening: no-new-privileges, `ipc: none` and the nproc ulimit
(the provider has no such fields; ALL capabilities are dropped instead, so a setuid binary gains nothing) and
tmpfs `noexec,nosuid` (tmpfs mounts take only a size and a mode).
"""
from __future__ import annotations

import abc
import base64
import dataclasses
import hashlib
import io
import tarfile
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import pulumi
import pulumi_docker as docker

from components.images import (
    BuildSettings,
    ModelImage,
    PlatformImages,
    PushTarget,
    build_image,
    pullable_image,
    pulled_image,
)
from components.workload import (
    APP_GID,
    APP_UID,
    APP_USER,
    DROPPED_CAPABILITIES,
    IPC_MODE,
    PROCESS_LIMIT,
    READ_ONLY_ROOT,
    SECRET_FILE_MODE,
    SECRETS_DIR,
    SECURITY_OPTIONS,
    TMP_MB,
    TMP_OPTIONS,
    TMP_PATH,
    Publish,
    Role,
    Run,
    SecretEnv,
    VolumeMount,
    Workload,
    component_labels,
    healthy_within_s,
    http_probe,
)
from mlops_spec.contract import SECRET_FILES_SUFFIX
from mlops_spec.encoding import NANO, provider_cpus
from mlops_spec.models import HealthCheck, ImageSource, SwarmSpec

MIB = 1024 * 1024
# Permission bits only: the provider reads a tmpfs mode back as `Mode.Perm()` (resource_docker_service_structures.go,
# flattenServiceMounts), which drops the sticky bit, and `mounts` is a set compared whole, so 0o1777 would update
# every service on every `pulumi up`. Nothing is lost: runc gives a tmpfs mounted over an existing directory that
# directory's mode, so /tmp keeps the image's 1777; and a task runs as one uid, whose files the sticky bit would
# only protect from itself.
TMP_MODE = 0o777
UNLIMITED_SWAP = -1
"""The swap limit an engine without swap accounting stores whatever it is given (`docker info`: SwapLimit false)."""
CONVERGE_POLL = "7s"
SECRET_NAME_HASH_CHARS = 12
TASK_NAME = "{{.Task.Name}}"
"""Swarm expands this Go template in a task's environment to the task's own name."""
SECRETS_VERSION_LABEL = "mlops.secrets"
"""On one host, the version of a container's secret files: a new content replaces the containers that read it."""
SECRET_UPLOAD_MODE = 0o444
"""Of a secret file on one host: the engine writes it as root (the provider's tar names no owner), and the
workload reads it as the app user."""


@dataclass(frozen=True)
class ComponentType:
    """A component's type token on each runtime: the tokens existing stacks' state knows it by, which its
    children's URNs are made of, so they stay as they were when each runtime had a component tree of its own."""

    single_host: str
    swarm: str


@dataclass(frozen=True)
class WorkloadImage:
    runs: pulumi.Input[str]
    """What the workload's containers or tasks run."""
    digest: pulumi.Input[str]
    """What a release records and promotion copies."""


@dataclass(frozen=True)
class Deployed:
    """A workload as it runs: what other workloads and the stack's outputs refer to it by."""

    resources: list[pulumi.CustomResource]
    name: pulumi.Output[str]
    """Known once it runs (healthy, where `pulumi up` waits for it)."""
    host_port: Optional[pulumi.Output[Optional[int]]]
    """Where the host publishes it; the provider's schema leaves a port Docker chooses optional."""
    hosts: list[str]
    """The names that reach it on the stage network: one per container, or Swarm's `tasks.<service>`."""
    every_task: bool
    """Whether each host name resolves to every task (Swarm's DNS), to be resolved again and again."""

    def addresses(self, port: int) -> list[str]:
        return [f"{host}:{port}" for host in self.hosts]


@dataclass(frozen=True, kw_only=True)
class Runtime(abc.ABC):
    """Renders workloads for one stage: its stack, labels, builds and the registry its images go to."""

    stack: str
    labels: dict[str, str]
    """The stage's labels (stack.stage_labels)."""
    identity: dict[str, str]
    """The stage's labels that never change for the life of a resource (stack.identity_labels)."""
    builds: BuildSettings
    platforms: PlatformImages
    """Where the platform images under the stage's model images are built, once each."""
    push: Optional[PushTarget] = None
    registry: Sequence[pulumi.Resource] = ()
    """What a push (and a pull from the stage's registry) waits for: the registry."""

    def with_registry(self, push: PushTarget, registry: Sequence[pulumi.Resource]) -> "Runtime":
        return dataclasses.replace(self, push=push, registry=registry)

    def model_image(self, model: Optional[str]) -> Optional[ModelImage]:
        return None if model is None else ModelImage(model, self.platforms)

    @abc.abstractmethod
    def type_token(self, component: ComponentType) -> str: ...

    @abc.abstractmethod
    def deploy(self, workload: Workload, parent: pulumi.Resource) -> Deployed: ...

    @abc.abstractmethod
    def image(self, resource_name: str, *, parent: pulumi.Resource, image: str, source: ImageSource | str,
              target: Optional[str] = None, released: bool = False, model: Optional[str] = None) -> WorkloadImage:
        """The image a workload runs that is built from `source` or pinned by it; a `released` one is what
        promotion copies, pushed to the stage's registry when built. Built with `model`, it is that model's
        image on the platform image `source` builds (components/images.py)."""

    @abc.abstractmethod
    def endpoint(self, deployed: Deployed, publish: Publish) -> pulumi.Output[str]:
        """The URL the published port answers at, for the stack's outputs."""

    @abc.abstractmethod
    def registry_server(self, deployed: Deployed) -> pulumi.Output[str]:
        """Where the stage's engines push to and pull from the image registry `deployed` runs."""

    def _env_values(self, workload: Workload, replica: str) -> list[tuple[str, pulumi.Input[str] | SecretEnv]]:
        return [(key, value(replica) if callable(value) else value) for key, value in workload.env.items()]


def unprivileged() -> dict[str, Any]:
    """A container's user, security options, capabilities and IPC mode, as every one the stack creates has them."""
    return {"user": APP_USER, "security_opts": list(SECURITY_OPTIONS),
            "capabilities": docker.ContainerCapabilitiesArgs(drops=list(DROPPED_CAPABILITIES)), "ipc_mode": IPC_MODE}


def go_duration(seconds: int) -> str:
    """A duration as Go's time.Duration.String() writes it (90 -> "1m30s"), as the provider reads a
    container's health-check durations back."""
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


@dataclass(frozen=True)
class SecretFiles:
    """A workload's secrets on one host: the volume holding them and the container that wrote them there."""

    volume: docker.Volume
    writer: docker.Container
    version: pulumi.Output[str]
    """Changes with any of the contents (content_hash), and says nothing usable about them."""


@dataclass(frozen=True, kw_only=True)
class SingleHost(Runtime):
    network: pulumi.Input[str]
    """The stage network's name."""
    limits_swap: bool = True
    """Whether the engine limits swap (components/engine_facts.py)."""

    def type_token(self, component: ComponentType) -> str:
        return component.single_host

    def deploy(self, workload: Workload, parent: pulumi.Resource) -> Deployed:
        replicas = ([(workload.resource_name, workload.name)] if workload.role is not Role.SPREAD else
                    [(f"{workload.resource_name}-{index}", f"{workload.name}-{index}")
                     for index in range(workload.replicas)])
        secrets = self._secret_files(workload, parent)
        containers = [self._container(resource_name, name, workload, parent, secrets)
                      for resource_name, name in replicas]
        return Deployed(resources=list(containers), name=containers[0].name,
                        host_port=containers[0].ports.apply(lambda ports: ports[0].external if ports else None)
                        if workload.publish else None,
                        hosts=[name for _, name in replicas], every_task=False)

    def _container(self, resource_name: str, name: str, workload: Workload, parent: pulumi.Resource,
                   secrets: Optional[SecretFiles]) -> docker.Container:
        """A non-root, read-only, capability-free container with limits, labels, a health check and restarts.
        With `wait_healthy`, `pulumi up` fails unless it turns healthy in time. Its secrets are files in
        `secrets`, mounted read-only, and a label carries their version, so new contents replace it."""
        check = workload.health.check
        wait = workload.wait_healthy
        publish = workload.publish
        volumes = list(workload.volumes)
        labels = [docker.ContainerLabelArgs(label=key, value=value) for key, value in component_labels(
            {**self.labels, **workload.identity, **workload.labels}, workload.component)]
        depends_on = list(workload.depends_on)
        if secrets is not None:
            volumes.append(VolumeMount(secrets.volume.name, SECRETS_DIR, read_only=True))
            labels.append(docker.ContainerLabelArgs(label=SECRETS_VERSION_LABEL, value=secrets.version))
            depends_on.append(secrets.writer)
        return docker.Container(
            resource_name,
            name=name,
            image=workload.image,
            **unprivileged(),
            read_only=READ_ONLY_ROOT,
            tmpfs={TMP_PATH: f"{TMP_OPTIONS},size={workload.tmp_mb}m"},
            # As the engine reads it back: one entry, soft equal to hard.
            ulimits=[docker.ContainerUlimitArgs(name="nproc", soft=PROCESS_LIMIT, hard=PROCESS_LIMIT)],
            memory=workload.limits.memory_mb,
            memory_swap=self.memory_swap(workload.limits.memory_mb),
            cpus=provider_cpus(workload.limits.cpus),
            labels=labels,
            healthcheck=docker.ContainerHealthcheckArgs(
                tests=http_probe(workload.health),
                interval=go_duration(check.interval_s), timeout=go_duration(check.timeout_s),
                retries=check.retries, start_period=go_duration(check.start_period_s)),
            wait=wait,
            wait_timeout=healthy_within_s(check) if wait else None,
            restart="unless-stopped",
            envs=[self._variable(key, value) for key, value in self._env_values(workload, name)] or None,
            ports=None if publish is None else [
                docker.ContainerPortArgs(internal=publish.port, external=publish.on.host_port, ip=publish.on.bind_address)],
            volumes=[docker.ContainerVolumeArgs(volume_name=mount.volume, container_path=mount.target,
                                                read_only=mount.read_only or None)
                     for mount in volumes] or None,
            networks_advanced=[docker.ContainerNetworksAdvancedArgs(name=self.network,
                                                                    aliases=list(workload.aliases) or None)],
            opts=pulumi.ResourceOptions(parent=parent, depends_on=depends_on or None),
        )

    def _secret_files(self, workload: Workload, parent: pulumi.Resource) -> Optional[SecretFiles]:
        """The workload's secrets as files `/run/secrets/<file>` in a volume of its own, so that no secret is in
        a container's configuration (`docker inspect`) or a process's environment (`/proc/<pid>/environ`).

        The provider's `upload` is the one way it writes a file into a container, and it extracts at `/` before
        the container starts (resource_docker_container_funcs.go), which the engine refuses for a read-only root
        unless the path is in a volume (daemon/archive.go, checkIfPathIsInAVolume: `/` never is). So a container
        that is created and never started (`start: false`, `must_run: false`, so Read leaves it alone) takes
        the uploads into the volume it mounts at /run/secrets, and the workload's own containers mount that
        volume read-only. The upload is `ForceNew`: new contents replace the writer, which writes them over
        the old files. The engine extracts as root, as the provider's tar header leaves the owner unset, so
        the files are readable by every uid (SECRET_UPLOAD_MODE); only this workload's containers mount the
        volume, and the volume's directory on the host is root's alone."""
        secrets = [value for value in workload.env.values() if isinstance(value, SecretEnv)]
        if not secrets:
            return None
        volume = docker.Volume(f"{workload.resource_name}{SECRET_FILES_SUFFIX}", name=f"{workload.name}{SECRET_FILES_SUFFIX}",
                               labels=[docker.VolumeLabelArgs(label=key, value=value)
                                       for key, value in component_labels(self.identity, workload.component)],
                               opts=pulumi.ResourceOptions(parent=parent))
        writer = docker.Container(
            f"{workload.resource_name}{SECRET_FILES_SUFFIX}-writer",
            name=f"{workload.name}{SECRET_FILES_SUFFIX}",
            # It never runs, so any image would do; the workload's own is the one sure to be on the engine.
            image=workload.image,
            start=False,
            must_run=False,
            # Hardened as a workload should someone start it, but for the read-only root, which `uploads` needs.
            **unprivileged(),
            network_mode="none",
            labels=[docker.ContainerLabelArgs(label=key, value=value)
                    for key, value in component_labels({**self.labels, **workload.identity}, workload.component)],
            volumes=[docker.ContainerVolumeArgs(volume_name=volume.name, container_path=SECRETS_DIR)],
            uploads=[docker.ContainerUploadArgs(file=f"{SECRETS_DIR}/{secret.file}",
                                                content=pulumi.Output.secret(secret.value),
                                                permissions=f"{SECRET_UPLOAD_MODE:04o}")
                     for secret in secrets],
            opts=pulumi.ResourceOptions(parent=parent),
        )
        version = pulumi.Output.unsecret(pulumi.Output.all(*(secret.value for secret in secrets)).apply(
            lambda values: content_hash(self.stack, workload.name, "\0".join(values))))
        return SecretFiles(volume=volume, writer=writer, version=version)

    def memory_swap(self, memory_mb: int) -> int:
        """The swap limit as the engine stores it, which the provider reads back (resourceDockerContainerRead in
        resource_docker_container_funcs.go: `memory_swap` is HostConfig.MemorySwap in MB when positive, else as
        is; the schema's field is Optional, not Computed, so any other value, or none, is a diff on every run).
        The engine doubles an unset limit (2 x memory), and one without swap accounting stores -1 whatever it is
        given (dockerd's verifyPlatformContainerResources). Equal to memory, the limit also means no swap; where
        the engine cannot limit swap, -1 declares what it does anyway."""
        return memory_mb if self.limits_swap else UNLIMITED_SWAP

    @staticmethod
    def _variable(key: str, value: pulumi.Input[str] | SecretEnv) -> pulumi.Input[str]:
        if isinstance(value, SecretEnv):
            return "=".join(value.file_variable(key))
        if isinstance(value, pulumi.Output):
            return pulumi.Output.concat(f"{key}=", value)
        return f"{key}={value}"

    def image(self, resource_name: str, *, parent: pulumi.Resource, image: str, source: ImageSource | str,
              target: Optional[str] = None, released: bool = False, model: Optional[str] = None) -> WorkloadImage:
        """The engine runs local images by ID: built here (and pushed too when released), or pulled by digest
        (from the stage's registry when released)."""
        after = list(self.registry) if released else None
        if isinstance(source, ImageSource) and source.build is not None:
            built = build_image(resource_name, parent=parent, stack=self.stack, image=image, context=source.build,
                                settings=self.builds, target=target, push=self.push if released else None,
                                push_after=after, model=self.model_image(model))
            return WorkloadImage(runs=built.image_id, digest=built.repo_digest)
        ref = source.pulled_ref if isinstance(source, ImageSource) else source
        pulled = pulled_image(resource_name, parent=parent, ref=ref, platform=self.builds.platform, depends_on=after)
        return WorkloadImage(runs=pulled.image_id, digest=pulled.image_id)

    def endpoint(self, deployed: Deployed, publish: Publish) -> pulumi.Output[str]:
        assert deployed.host_port is not None
        return deployed.host_port.apply(lambda port: f"http://{publish.on.bind_address}:{port}")

    def registry_server(self, deployed: Deployed) -> pulumi.Output[str]:
        # The Docker engine pushes over loopback, which it trusts without TLS.
        assert deployed.host_port is not None
        return deployed.host_port.apply(lambda port: f"localhost:{port}")


def swarm_duration(seconds: int) -> str:
    """A duration as the provider reads a service's back: Go's form, then "1m0s" -> "1m", "1h0m" -> "1h"."""
    text = go_duration(seconds)
    if text.endswith("m0s"):
        text = text[:-2]
    return text[:-2] if text.endswith("h0m") else text


def monitor_s(check: HealthCheck) -> int:
    """How long Swarm watches an updated task before the next one: long enough for the health check to
    declare it unhealthy after it first passed (every retry failing), plus one interval."""
    return (check.retries + 1) * (check.interval_s + check.timeout_s)


def converge_within_s(check: HealthCheck, replicas: int) -> int:
    """How long `pulumi up` waits for a rolling update of `replicas` tasks to converge."""
    return replicas * (healthy_within_s(check) + monitor_s(check))


def nano_cpus(cpus: float) -> int:
    return round(cpus * NANO)


def placement_platform(platform: str) -> docker.ServiceTaskSpecPlacementPlatformArgs:
    """`linux/amd64` as a service's placement platform. The provider creates a service with QueryRegistry, and
    the Docker client then replaces the placement's platforms with those the registry lists for the image
    (docker/docker v28.5.2 client/service_create.go, resolveContainerSpecImage and imageDigestAndPlatforms:
    each platform's architecture and OS as the image's manifest or config names them, `amd64`, `arm64`);
    Read returns them (flattenPlacementPlatforms). An image built for the stage's platform lists exactly this
    one, so the second `pulumi up` sees no change; an update sends the declared platforms as they are."""
    os_name, architecture = platform.split("/")
    return docker.ServiceTaskSpecPlacementPlatformArgs(architecture=architecture, os=os_name)


def content_hash(stack: str, purpose: str, content: str) -> str:
    """A secret's version: salted with the stack and purpose and cut to 48 bits, it tells versions apart and
    says nothing usable about the value. The salt's text is what Swarm secrets were first named with, so their
    names stay."""
    digest = hashlib.sha256(f"mlops-swarm-secret\0{stack}\0{purpose}\0{content}".encode()).hexdigest()
    return digest[:SECRET_NAME_HASH_CHARS]


def secret_name(stack: str, purpose: str, content: str) -> str:
    """`<stack>-<purpose>-<hash>`: Swarm secrets are immutable and every field of the provider's Secret is
    ForceNew, so a new content gets a new name, the replacement is created before Pulumi lets go of the old one
    and services move over in a rolling update."""
    return f"{stack}-{purpose}-{content_hash(stack, purpose, content)}"


@dataclass(frozen=True, kw_only=True)
class Swarm(Runtime):
    spec: SwarmSpec
    network_id: pulumi.Input[str]
    """The overlay network, by the ID the provider reads back."""
    published_host: str
    """The manager's address, where mlops reaches what the stage publishes."""
    created_secrets: dict[str, docker.Secret] = field(default_factory=dict, compare=False)
    """Secrets by resource name, created by the first workload that mounts them."""

    def type_token(self, component: ComponentType) -> str:
        return component.swarm

    def deploy(self, workload: Workload, parent: pulumi.Resource) -> Deployed:
        """A non-root, read-only, capability-free service with limits, reservations, a health check, placement
        by role, a rolling update policy and `dnsrr` endpoints (service VIPs need IPVS).

        With `wait_healthy`, `pulumi up` waits until every task runs healthy; the provider deletes a service
        that does not converge on create, and fails the update when Swarm rolled it back. A published port is
        published in host mode on the node a task runs on."""
        role = workload.role
        check = workload.health.check
        replicas = None if role is Role.EDGE else workload.replicas
        order = "start-first" if role is Role.SPREAD else "stop-first"
        reservations = self.spec.reservations if role is Role.SPREAD else workload.limits
        constraints = {Role.STATEFUL: [f"node.labels.{self.spec.stateful_label} == true"],
                       Role.SPREAD: self.spec.constraints,
                       Role.EDGE: [f"node.labels.{self.spec.edge_label} == true"]}[role]
        env: dict[str, pulumi.Input[str]] = {}
        secrets = []
        for key, value in self._env_values(workload, TASK_NAME):
            if isinstance(value, SecretEnv):
                variable, path = value.file_variable(key)
                env[variable] = path
                secrets.append(self._secret_file(value, parent))
            else:
                env[key] = value
        mounts = [docker.ServiceTaskSpecContainerSpecMountArgs(
            target=TMP_PATH, type="tmpfs", tmpfs_options=docker.ServiceTaskSpecContainerSpecMountTmpfsOptionsArgs(
                size_bytes=workload.tmp_mb * MIB, mode=TMP_MODE))]
        mounts += [docker.ServiceTaskSpecContainerSpecMountArgs(target=mount.target, type="volume", source=mount.volume,
                                                                read_only=mount.read_only or None)
                   for mount in sorted(workload.volumes, key=lambda mount: mount.target)]
        publish = workload.publish
        service = docker.Service(
            workload.resource_name,
            name=workload.name,
            labels=[docker.ServiceLabelArgs(label=key, value=value) for key, value in component_labels(
                {**self.labels, **workload.identity, **workload.labels}, workload.component)],
            mode=docker.ServiceModeArgs(global_=True) if replicas is None else docker.ServiceModeArgs(
                replicated=docker.ServiceModeReplicatedArgs(replicas=replicas)),
            task_spec=docker.ServiceTaskSpecArgs(
                container_spec=docker.ServiceTaskSpecContainerSpecArgs(
                    image=workload.image,
                    user=APP_USER,
                    read_only=READ_ONLY_ROOT,
                    cap_drops=list(DROPPED_CAPABILITIES),
                    # Identity only: container labels are ForceNew in the provider (a model pin or owner here
                    # would replace the service instead of rolling it); the service's own labels carry the rest.
                    labels=[docker.ServiceTaskSpecContainerSpecLabelArgs(label=key, value=value)
                            for key, value in component_labels({**self.identity, **workload.identity},
                                                               workload.component)],
                    env=env or None,
                    secrets=secrets or None,
                    mounts=mounts,
                    healthcheck=docker.ServiceTaskSpecContainerSpecHealthcheckArgs(
                        tests=http_probe(workload.health),
                        interval=swarm_duration(check.interval_s), timeout=swarm_duration(check.timeout_s),
                        retries=check.retries, start_period=swarm_duration(check.start_period_s)),
                ),
                resources=docker.ServiceTaskSpecResourcesArgs(
                    limits=docker.ServiceTaskSpecResourcesLimitsArgs(nano_cpus=nano_cpus(workload.limits.cpus),
                                                                     memory_bytes=workload.limits.memory_mb * MIB),
                    reservation=docker.ServiceTaskSpecResourcesReservationArgs(
                        nano_cpus=nano_cpus(reservations.cpus), memory_bytes=reservations.memory_mb * MIB)),
                placement=docker.ServiceTaskSpecPlacementArgs(
                    constraints=list(constraints) or None,
                    prefs=[self.spec.spread_over] if role is Role.SPREAD and self.spec.spread_over else None,
                    platforms=[placement_platform(self.builds.platform)]),
                restart_policy=docker.ServiceTaskSpecRestartPolicyArgs(condition="any", delay="5s", max_attempts=0,
                                                                       window="0s"),
                networks_advanceds=[docker.ServiceTaskSpecNetworksAdvancedArgs(id=self.network_id)],
            ),
            endpoint_spec=docker.ServiceEndpointSpecArgs(mode="dnsrr", ports=None if publish is None else [
                docker.ServiceEndpointSpecPortArgs(target_port=publish.port, published_port=publish.on.host_port,
                                                   publish_mode="host", protocol="tcp")]),
            # One task at a time, gated by health; any failure rolls the whole service back to the last spec.
            update_config=docker.ServiceUpdateConfigArgs(
                parallelism=1, delay="0s", order=order, failure_action="rollback",
                monitor=swarm_duration(monitor_s(check)), max_failure_ratio="0.0"),
            # A rollback goes back to the spec that ran before, so it runs to the end: a rollback task that fails
            # or is cut short (Swarm's restart of the failed release's slot can race the rollback's own task there)
            # is restarted by the restart policy, whereas `pause` would leave the failed release's other replicas
            # serving until someone deploys again.
            rollback_config=docker.ServiceRollbackConfigArgs(
                parallelism=1, delay="0s", order=order, failure_action="continue",
                monitor=swarm_duration(monitor_s(check)), max_failure_ratio="0.0"),
            # Global services cannot converge in the provider.
            converge_config=docker.ServiceConvergeConfigArgs(
                delay=CONVERGE_POLL, timeout=swarm_duration(converge_within_s(check, replicas)))
            if workload.wait_healthy and replicas is not None else None,
            opts=pulumi.ResourceOptions(parent=parent, depends_on=list(workload.depends_on) or None,
                                        delete_before_replace=True),
        )
        return Deployed(resources=[service], name=service.name,
                        host_port=None if publish is None else pulumi.Output.from_input(publish.on.host_port),
                        hosts=[f"tasks.{workload.name}"], every_task=True)

    def _secret_file(self, secret: SecretEnv, parent: pulumi.Resource) -> docker.ServiceTaskSpecContainerSpecSecretArgs:
        """`secret` as `/run/secrets/<file>`, readable by the app user only; one `docker.Secret` per resource
        name, however many workloads mount it."""
        if secret.resource_name not in self.created_secrets:
            value = pulumi.Output.secret(secret.value)
            self.created_secrets[secret.resource_name] = docker.Secret(
                secret.resource_name,
                name=pulumi.Output.unsecret(value.apply(lambda content: secret_name(self.stack, secret.purpose, content))),
                data=value.apply(lambda content: base64.b64encode(content.encode()).decode()),
                labels=[docker.SecretLabelArgs(label=key, value=value) for key, value in self.identity.items()],
                # The provider's converge returns before Swarm's monitor window ends, and a rollback after it
                # goes back to a spec that mounts the secret this one replaced: Pulumi only forgets a replaced
                # secret, and `mlops settle` removes it once no service's spec or previous spec mounts it.
                opts=pulumi.ResourceOptions(parent=parent, retain_on_delete=True))
        created = self.created_secrets[secret.resource_name]
        return docker.ServiceTaskSpecContainerSpecSecretArgs(
            secret_id=created.id, secret_name=created.name, file_name=f"{SECRETS_DIR}/{secret.file}",
            file_uid=APP_UID, file_gid=APP_GID, file_mode=SECRET_FILE_MODE)

    def image(self, resource_name: str, *, parent: pulumi.Resource, image: str, source: ImageSource | str,
              target: Optional[str] = None, released: bool = False, model: Optional[str] = None) -> WorkloadImage:
        """What any node can pull: a build pushed to the stage's registry, by digest, or the pinned reference."""
        assert self.push is not None, "a swarm stage needs its image registry"
        pullable = pullable_image(resource_name, parent=parent, stack=self.stack, image=image, source=source,
                                  settings=self.builds, push=self.push, push_after=list(self.registry), target=target,
                                  model=self.model_image(model))
        return WorkloadImage(runs=pullable, digest=pullable)

    def endpoint(self, deployed: Deployed, publish: Publish) -> pulumi.Output[str]:
        # Every node that runs a task answers on the port; this names the manager's, as mlops reaches the
        # stage there.
        return pulumi.Output.from_input(f"http://{self.published_host}:{publish.on.host_port}")

    def registry_server(self, deployed: Deployed) -> pulumi.Output[str]:
        # Known once the service converged, so pushes wait for a registry that answers.
        registry_address = self.spec.registry_address
        return deployed.name.apply(lambda _: registry_address)


def _repeated(option: str, values: Sequence[str]) -> list[str]:
    return [argument for value in values for argument in (option, value)]


def _run_options(run: Run) -> list[str]:
    """What a one-off run gets on one host and on a swarm alike: its name, network, user, read-only root, no
    capabilities and its labels."""
    return [*(["--name", run.name] if run.name else []), "--network", run.network, "--user", APP_USER,
            *(["--read-only"] if READ_ONLY_ROOT else []), *_repeated("--cap-drop", DROPPED_CAPABILITIES),
            *_repeated("--label", [f"{key}={value}" for key, value in component_labels(run.labels, run.component)])]


def docker_run_arguments(run: Run) -> list[str]:
    """`docker run` arguments of `run`, which has no secret: one that has is created, given its secret files,
    then started (`docker_create_arguments`)."""
    if run.secrets():
        raise ValueError(f"{run.component} has secrets: create it with docker_create_arguments")
    return ["run", *_one_host_run_options(run)]


def docker_create_arguments(run: Run) -> list[str]:
    """`docker create` arguments of `run`. Each secret is the file that `<VARIABLE>_FILE` names, in an anonymous
    volume at /run/secrets that goes with the run: `docker cp - <name>:/run/secrets` extracts
    `secret_files_archive` there from its standard input (the engine lets an archive into a volume of a
    container whose root is read-only, and keeps the owner its headers name), then `docker start --attach`
    runs it. So no secret is in a process's arguments, in the run's configuration (`docker inspect`) or in a
    process's environment."""
    return ["create", "--volume", SECRETS_DIR, *_one_host_run_options(run)]


def secret_files_archive(run: Run) -> bytes:
    """The tar of `run`'s secret files, owned by the app user and readable by it alone, as on a swarm."""
    archive_bytes = io.BytesIO()
    with tarfile.open(fileobj=archive_bytes, mode="w") as archive:
        for secret in run.secrets().values():
            content = str(secret.value).encode()
            entry = tarfile.TarInfo(secret.file)
            entry.size, entry.mode, entry.uid, entry.gid = len(content), SECRET_FILE_MODE, int(APP_UID), int(APP_GID)
            archive.addfile(entry, io.BytesIO(content))
    return archive_bytes.getvalue()


def _one_host_run_options(run: Run) -> list[str]:
    """What `docker run` and `docker create` share: removed when it ends, hardened, limited, and given its
    variables, a secret's by the path of its file."""
    memory = f"{run.limits.memory_mb}m"
    return [
        "--rm", *(["--interactive"] if run.interactive else []), *_run_options(run),
        "--tmpfs", f"{TMP_PATH}:{TMP_OPTIONS},size={TMP_MB}m", *_repeated("--security-opt", SECURITY_OPTIONS),
        "--ipc", IPC_MODE, "--ulimit", f"nproc={PROCESS_LIMIT}:{PROCESS_LIMIT}",
        "--cpus", str(run.limits.cpus), "--memory", memory, "--memory-swap", memory,
        *(["--gpus", "all"] if run.gpus else []),
        *_repeated("--volume", [f"{mount.volume}:{mount.target}{':ro' if mount.read_only else ''}"
                                for mount in run.volumes]),
        *_run_variables(run),
        "--entrypoint", run.entrypoint[0], run.image, *run.entrypoint[1:], *run.args,
    ]


def _run_variables(run: Run) -> list[str]:
    return _repeated("--env", ["=".join(value.file_variable(key)) if isinstance(value, SecretEnv) else f"{key}={value}"
                               for key, value in run.env.items()])


def service_job_arguments(run: Run) -> list[str]:
    """`docker service create` arguments of `run` as a one-shot job (`replicated-job`, never restarted),
    reserved as much as limited so it lands only where its resources are free. Each secret is the Swarm
    secret `resource_name`, mounted as the file that `<VARIABLE>_FILE` names: the value never is an option of
    the service."""
    cpus, memory = str(run.limits.cpus), f"{run.limits.memory_mb}M"
    return [
        "service", "create", "--detach", "--with-registry-auth", *_run_options(run),
        "--mode", "replicated-job", "--restart-condition", "none",
        "--limit-cpu", cpus, "--limit-memory", memory, "--reserve-cpu", cpus, "--reserve-memory", memory,
        *_repeated("--generic-resource", [f"{kind}={count}" for kind, count in sorted(run.generic_resources.items())]),
        *_repeated("--constraint", run.constraints),
        "--mount", f"type=tmpfs,destination={TMP_PATH},tmpfs-size={TMP_MB * MIB}",
        *_repeated("--mount", [f"type=volume,source={mount.volume},destination={mount.target}"
                               f"{',readonly' if mount.read_only else ''}" for mount in run.volumes]),
        *_repeated("--secret", [f"source={secret.resource_name},target={secret.file},uid={APP_UID},gid={APP_GID},"
                                f"mode={SECRET_FILE_MODE:04o}" for secret in run.secrets().values()]),
        *_run_variables(run),
        "--entrypoint", run.entrypoint[0], run.image, *run.entrypoint[1:], *run.args,
    ]
