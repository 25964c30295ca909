"""The hardening every container of the stack gets, in one place so no component can forget a part."""
from __future__ import annotations

from typing import Optional, Sequence

import pulumi
import pulumi_docker as docker

from mlops.spec import HealthCheck, Limits, PublishedPort

APP_USER = "10001:10001"
DEFAULT_TMPFS = {"/tmp": "rw,noexec,nosuid,size=64m"}


def container_labels(labels: dict[str, str], component: str) -> list[docker.ContainerLabelArgs]:
    return [docker.ContainerLabelArgs(label=key, value=value)
            for key, value in sorted({**labels, "mlops.component": component}.items())]


def http_healthcheck(port: int, path: str, check: HealthCheck) -> docker.ContainerHealthcheckArgs:
    """An HTTP probe that needs nothing but the base image's python3; any answer below 500 is alive."""
    probe = ("import sys,urllib.request,urllib.error\n"
             "try: urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2]))\n"
             "except urllib.error.HTTPError as e: sys.exit(e.code >= 500)\n"
             "except Exception: sys.exit(1)")
    return docker.ContainerHealthcheckArgs(
        tests=["CMD", "python3", "-c", probe, f"http://127.0.0.1:{port}{path}", str(check.timeout_s)],
        interval=f"{check.interval_s}s", timeout=f"{check.timeout_s}s",
        retries=check.retries, start_period=f"{check.start_period_s}s")


def published(internal: int, port: PublishedPort) -> list[docker.ContainerPortArgs]:
    return [docker.ContainerPortArgs(internal=internal, external=port.host_port, ip=port.bind_address)]


def hardened_container(
    resource_name: str,
    *,
    parent: pulumi.Resource,
    name: str,
    image: pulumi.Input[str],
    network: pulumi.Input[str],
    limits: Limits,
    labels: list[docker.ContainerLabelArgs],
    healthcheck: docker.ContainerHealthcheckArgs,
    envs: Optional[Sequence[pulumi.Input[str]]] = None,
    command: Optional[Sequence[str]] = None,
    ports: Optional[list[docker.ContainerPortArgs]] = None,
    volumes: Optional[list[docker.ContainerVolumeArgs]] = None,
    tmpfs: Optional[dict[str, str]] = None,
    aliases: Optional[list[str]] = None,
    depends_on: Optional[list[pulumi.Resource]] = None,
) -> docker.Container:
    """A non-root, read-only, capability-free container with limits, labels, a health check and restarts."""
    return docker.Container(
        resource_name,
        name=name,
        image=image,
        user=APP_USER,
        read_only=True,
        tmpfs=tmpfs or DEFAULT_TMPFS,
        security_opts=["no-new-privileges:true"],
        capabilities=docker.ContainerCapabilitiesArgs(drops=["ALL"]),
        memory=limits.memory_mb,
        cpus=str(limits.cpus),
        labels=labels,
        healthcheck=healthcheck,
        restart="unless-stopped",
        envs=envs,
        command=command,
        ports=ports,
        volumes=volumes,
        networks_advanced=[docker.ContainerNetworksAdvancedArgs(name=network, aliases=aliases)],
        opts=pulumi.ResourceOptions(parent=parent, depends_on=depends_on),
    )
