"""The hardening, placement and update policy every Swarm service of a stack gets, in one place (the
counterpart of containers.py for a stage with a `swarm` key).

Rendered as terraform-provider-docker v4.5.0 reads a service back (resource_docker_service_structures.go),
so a second `pulumi up` shows no diff: durations in `shortDur` form ("1m", not "1m0s"), `max_failure_ratio`
with one decimal ("0.0"), networks by ID (`flattenTaskNetworksAdvanced` writes back the target ID; a name
would replace the service on every run), placement preferences as bare spread descriptors.

What a service spec cannot express, against docs/contracts.md's container hardening: no-new-privileges and
`ipc: none` (the provider has no such field; ALL capabilities are dropped instead, so a setuid binary gains
nothing) and tmpfs `noexec,nosuid` (tmpfs mounts take only a size and a mode).
"""
from __future__ import annotations

import base64
import hashlib
from typing import Optional, Sequence

import pulumi
import pulumi_docker as docker

from components.containers import APP_USER, go_duration, healthy_within_s, http_probe
from mlops.spec import NANO, HealthCheck, Limits

MIB = 1024 * 1024
TMP_BYTES = 64 * MIB
# Permission bits only: the provider reads a tmpfs mode back as `Mode.Perm()` (resource_docker_service_structures.go,
# flattenServiceMounts), which drops the sticky bit, and `mounts` is a set compared whole, so 0o1777 would update
# every service on every `pulumi up`. Nothing is lost: runc gives a tmpfs mounted over an existing directory that
# directory's mode, so /tmp keeps the image's 1777; and a task runs as one uid, whose files the sticky bit would
# only protect from itself.
TMP_MODE = 0o777
SECRETS_DIR = "/run/secrets"
CONVERGE_POLL = "7s"
SECRET_NAME_HASH_CHARS = 12
APP_UID, APP_GID = APP_USER.split(":")


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


def update_policy(check: HealthCheck, order: str) -> docker.ServiceUpdateConfigArgs:
    """One task at a time, gated by health; any failure rolls the whole service back to the last spec."""
    return docker.ServiceUpdateConfigArgs(parallelism=1, delay="0s", order=order, failure_action="rollback",
                                          monitor=swarm_duration(monitor_s(check)), max_failure_ratio="0.0")


def rollback_policy(check: HealthCheck, order: str) -> docker.ServiceRollbackConfigArgs:
    """A rollback that fails too pauses (Swarm's only choices are pause and continue) for a human to look."""
    return docker.ServiceRollbackConfigArgs(parallelism=1, delay="0s", order=order, failure_action="pause",
                                            monitor=swarm_duration(monitor_s(check)), max_failure_ratio="0.0")


def converge_within_s(check: HealthCheck, replicas: int) -> int:
    """How long `pulumi up` waits for a rolling update of `replicas` tasks to converge."""
    return replicas * (healthy_within_s(check) + monitor_s(check))


def nano_cpus(cpus: float) -> int:
    return round(cpus * NANO)


def secret_name(stack: str, purpose: str, content: str) -> str:
    """`<stack>-<purpose>-<hash>`: Swarm secrets are immutable and every field of the provider's Secret is
    ForceNew, so a new content gets a new name, the replacement is created before the old one is deleted and
    services move over in a rolling update. The hash is salted with the stack and purpose and cut to 48 bits:
    it tells versions apart and says nothing usable about the value."""
    digest = hashlib.sha256(f"mlops-swarm-secret\0{stack}\0{purpose}\0{content}".encode()).hexdigest()
    return f"{stack}-{purpose}-{digest[:SECRET_NAME_HASH_CHARS]}"


def swarm_secret(resource_name: str, *, parent: pulumi.Resource, stack: str, purpose: str,
                 value: pulumi.Input[str]) -> docker.Secret:
    secret_value = pulumi.Output.secret(value)
    return docker.Secret(
        resource_name,
        name=pulumi.Output.unsecret(secret_value.apply(lambda content: secret_name(stack, purpose, content))),
        data=secret_value.apply(lambda content: base64.b64encode(content.encode()).decode()),
        opts=pulumi.ResourceOptions(parent=parent))


def secret_file(secret: docker.Secret, file_name: str) -> docker.ServiceTaskSpecContainerSpecSecretArgs:
    """`secret` as `/run/secrets/<file_name>`, readable by the app user only."""
    return docker.ServiceTaskSpecContainerSpecSecretArgs(secret_id=secret.id, secret_name=secret.name,
                                                         file_name=f"{SECRETS_DIR}/{file_name}",
                                                         file_uid=APP_UID, file_gid=APP_GID, file_mode=0o400)


def service_labels(labels: dict[str, str], component: str) -> list[docker.ServiceLabelArgs]:
    return [docker.ServiceLabelArgs(label=key, value=value)
            for key, value in sorted({**labels, "mlops.component": component}.items())]


def hardened_service(
    resource_name: str,
    *,
    parent: pulumi.Resource,
    name: str,
    image: pulumi.Input[str],
    network_id: pulumi.Input[str],
    limits: Limits,
    reservations: Limits,
    labels: dict[str, str],
    identity: dict[str, str],
    component: str,
    health_check: HealthCheck,
    health_path: tuple[int, str],
    replicas: Optional[int],
    order: str,
    converge: bool,
    constraints: Sequence[str] = (),
    spread_over: Optional[str] = None,
    env: Optional[dict[str, pulumi.Input[str]]] = None,
    secrets: Sequence[docker.ServiceTaskSpecContainerSpecSecretArgs] = (),
    published: Optional[tuple[int, Optional[int]]] = None,
    volumes: Optional[dict[str, pulumi.Input[str]]] = None,
    tmp_bytes: int = TMP_BYTES,
    depends_on: Optional[list[pulumi.Resource]] = None,
) -> docker.Service:
    """A non-root, read-only, capability-free service with limits, reservations, a health check, placement,
    a rolling update policy and `dnsrr` endpoints (service VIPs need IPVS).

    `replicas` None runs one task on every node the constraints allow (global mode). With `converge`,
    `pulumi up` waits until every task runs healthy; the provider deletes a service that does not converge
    on create, and fails the update when Swarm rolled it back. `published` is (container port, host port),
    published in host mode on the node a task runs on."""
    port, path = health_path
    mounts = [docker.ServiceTaskSpecContainerSpecMountArgs(
        target="/tmp", type="tmpfs", tmpfs_options=docker.ServiceTaskSpecContainerSpecMountTmpfsOptionsArgs(
            size_bytes=tmp_bytes, mode=TMP_MODE))]
    mounts += [docker.ServiceTaskSpecContainerSpecMountArgs(target=target, type="volume", source=volume)
               for target, volume in sorted((volumes or {}).items())]
    return docker.Service(
        resource_name,
        name=name,
        labels=service_labels(labels, component),
        mode=docker.ServiceModeArgs(global_=True) if replicas is None else docker.ServiceModeArgs(
            replicated=docker.ServiceModeReplicatedArgs(replicas=replicas)),
        task_spec=docker.ServiceTaskSpecArgs(
            container_spec=docker.ServiceTaskSpecContainerSpecArgs(
                image=image,
                user=APP_USER,
                read_only=True,
                cap_drops=["ALL"],
                # Identity only: container labels are ForceNew in the provider (a model pin or owner here
                # would replace the service instead of rolling it); the service's own labels carry the rest.
                labels=[docker.ServiceTaskSpecContainerSpecLabelArgs(label=key, value=value)
                        for key, value in sorted({**identity, "mlops.component": component}.items())],
                env=env,
                secrets=list(secrets) or None,
                mounts=mounts,
                healthcheck=docker.ServiceTaskSpecContainerSpecHealthcheckArgs(
                    tests=http_probe(port, path, health_check), interval=swarm_duration(health_check.interval_s),
                    timeout=swarm_duration(health_check.timeout_s), retries=health_check.retries,
                    start_period=swarm_duration(health_check.start_period_s)),
            ),
            resources=docker.ServiceTaskSpecResourcesArgs(
                limits=docker.ServiceTaskSpecResourcesLimitsArgs(nano_cpus=nano_cpus(limits.cpus),
                                                                 memory_bytes=limits.memory_mb * MIB),
                # Always set: Docker reports an empty reservation, which the provider reads back as zeros.
                reservation=docker.ServiceTaskSpecResourcesReservationArgs(
                    nano_cpus=nano_cpus(reservations.cpus), memory_bytes=reservations.memory_mb * MIB)),
            placement=docker.ServiceTaskSpecPlacementArgs(constraints=list(constraints) or None,
                                                          prefs=[spread_over] if spread_over else None),
            # Every field set: the provider sends the unset ones as zero and reads them back as "0s" and 0.
            restart_policy=docker.ServiceTaskSpecRestartPolicyArgs(condition="any", delay="5s", max_attempts=0,
                                                                   window="0s"),
            networks_advanceds=[docker.ServiceTaskSpecNetworksAdvancedArgs(id=network_id)],
        ),
        endpoint_spec=docker.ServiceEndpointSpecArgs(mode="dnsrr", ports=None if published is None else [
            docker.ServiceEndpointSpecPortArgs(target_port=published[0], published_port=published[1],
                                               publish_mode="host", protocol="tcp")]),
        update_config=update_policy(health_check, order),
        rollback_config=rollback_policy(health_check, order),
        converge_config=docker.ServiceConvergeConfigArgs(
            delay=CONVERGE_POLL, timeout=swarm_duration(converge_within_s(health_check, replicas or 1)))
        if converge and replicas is not None else None,
        opts=pulumi.ResourceOptions(parent=parent, depends_on=depends_on),
    )
