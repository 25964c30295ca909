"""The hardening every container of the stack gets, in one place so no component can forget a part."""
from __future__ import annotations

from typing import Optional, Sequence

import pulumi
import pulumi_docker as docker

from mlops_spec.encoding import provider_cpus
from mlops_spec.models import HealthCheck, Limits, PublishedPort

APP_USER = "10001:10001"
DEFAULT_TMPFS = {"/tmp": "rw,noexec,nosuid,size=64m"}
# No /dev/shm at all, so /tmp stays the only writable path besides volumes (docs/contracts.md), and no IPC
# namespace shared with anything. Checked with every image: nginx, uvicorn (oip), MLServer, MLflow, the
# registry and a scikit-learn training run (joblib warns it runs serially, as training's n_jobs=1 does
# anyway; same model sha256) work without it. The engine reads it back as "none".
IPC_MODE = "none"
# pulumi-docker 5.2.0's Container has no pids_limit (the cgroup pids controller, `docker run --pids-limit`),
# so the nearest guard it offers is RLIMIT_NPROC. That counts the processes and threads of the user on the
# whole host, not per container, and every container runs as uid 10001: the limit bounds all uid-10001
# containers of all stacks on a host together. A fork bomb in one container then stops at PROCESS_LIMIT
# tasks instead of exhausting the host's PIDs (32768 here), though until it is killed the other uid-10001
# containers cannot start threads either. A stage at rest runs about 30 such tasks (measured: MLflow 14, the
# registry 5, the gateway 3, an oip replica 6, an MLServer one 12); 4096 leaves room for many stages and
# experiments on one host, and their training runs.
PROCESS_LIMIT = 4096


def container_labels(labels: dict[str, str], component: str) -> list[docker.ContainerLabelArgs]:
    return [docker.ContainerLabelArgs(label=key, value=value)
            for key, value in sorted({**labels, "mlops.component": component}.items())]


def go_duration(seconds: int) -> str:
    """A duration as Go's time.Duration.String() writes it (90 -> "1m30s"): the provider reads health-check
    durations back in that form (terraform-provider-docker v4.5.0, resource_docker_container_funcs.go), so
    "60s" would differ from the state on every `pulumi up`."""
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def healthy_within_s(check: HealthCheck) -> int:
    """How long `pulumi up` waits for a new container to turn healthy: the start period, then every retry
    failing at its timeout, plus one more interval and a margin for the engine."""
    return check.start_period_s + (check.retries + 1) * (check.interval_s + check.timeout_s) + 30


def http_probe(port: int, path: str, check: HealthCheck) -> list[str]:
    """An HTTP probe that needs nothing but the base image's python3; any answer below 500 is alive."""
    probe = ("import sys,urllib.request,urllib.error\n"
             "try: urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2]))\n"
             "except urllib.error.HTTPError as e: sys.exit(e.code >= 500)\n"
             "except Exception: sys.exit(1)")
    return ["CMD", "python3", "-c", probe, f"http://127.0.0.1:{port}{path}", str(check.timeout_s)]


def http_healthcheck(port: int, path: str, check: HealthCheck) -> docker.ContainerHealthcheckArgs:
    return docker.ContainerHealthcheckArgs(
        tests=http_probe(port, path, check),
        interval=go_duration(check.interval_s), timeout=go_duration(check.timeout_s),
        retries=check.retries, start_period=go_duration(check.start_period_s))


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
    health_check: HealthCheck,
    health_path: tuple[int, str],
    wait: bool = True,
    envs: Optional[Sequence[pulumi.Input[str]]] = None,
    command: Optional[Sequence[str]] = None,
    ports: Optional[list[docker.ContainerPortArgs]] = None,
    volumes: Optional[list[docker.ContainerVolumeArgs]] = None,
    tmpfs: Optional[dict[str, str]] = None,
    aliases: Optional[list[str]] = None,
    depends_on: Optional[list[pulumi.Resource]] = None,
) -> docker.Container:
    """A non-root, read-only, capability-free container with limits, labels, a health check and restarts.

    With `wait`, `pulumi up` fails unless the container turns healthy in time, and whatever depends on it
    starts only once it answers."""
    port, path = health_path
    return docker.Container(
        resource_name,
        name=name,
        image=image,
        user=APP_USER,
        read_only=True,
        tmpfs=tmpfs or DEFAULT_TMPFS,
        security_opts=["no-new-privileges:true"],
        capabilities=docker.ContainerCapabilitiesArgs(drops=["ALL"]),
        ipc_mode=IPC_MODE,
        # As the engine reads it back: one entry, soft equal to hard.
        ulimits=[docker.ContainerUlimitArgs(name="nproc", soft=PROCESS_LIMIT, hard=PROCESS_LIMIT)],
        memory=limits.memory_mb,
        # Docker doubles an unset swap limit and the provider reads that back, a diff on every run; equal
        # to memory it also means no swap.
        memory_swap=limits.memory_mb,
        cpus=provider_cpus(limits.cpus),
        labels=labels,
        healthcheck=http_healthcheck(port, path, health_check),
        wait=wait,
        wait_timeout=healthy_within_s(health_check) if wait else None,
        restart="unless-stopped",
        envs=envs,
        command=command,
        ports=ports,
        volumes=volumes,
        networks_advanced=[docker.ContainerNetworksAdvancedArgs(name=network, aliases=aliases)],
        opts=pulumi.ResourceOptions(parent=parent, depends_on=depends_on),
    )
