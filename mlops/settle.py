"""Whether a swarm stage's services have settled after `pulumi up`, as Swarm itself reports it.

The provider's converge returns as soon as a service runs as many tasks as it declares, while Swarm keeps an
update in `updating` for one more `monitor` window and may still roll it back (kreuzwerker/terraform-provider-docker
`resource_docker_service_funcs.go`: the converge loop counts running tasks only; docs/day-two.md). A service whose
update Swarm rolled back runs the spec before the update, while the Pulumi state holds the new one, and the next
`pulumi up` without `--refresh` sees no difference. `settle` waits until no service of the stage is updating and
every one runs the tasks it declares, and reports every service Swarm rolled back or paused.

The stack's secrets are content-named and replaced when a password changes; Pulumi lets go of a replaced one
without deleting it (`retain_on_delete`), since a rollback after the deploy returns to a spec that mounts it.
Once the services settled, `remove_unmounted_secrets` deletes the stack's secrets that neither a service's spec
nor its previous spec (where `docker service rollback` and Swarm's own rollback go) mounts.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Callable, Optional

from components.runtimes import converge_within_s
from mlops.orphans import DockerError, _docker
from mlops_spec.contract import COMPONENT_LABEL
from mlops_spec.models import StageSpec

# Swarm's UpdateStatus.State values (moby api/types/swarm/service.go).
IN_PROGRESS = frozenset({"updating", "rollback_started"})
REFUSED = frozenset({"rollback_completed", "rollback_paused", "paused"})
POLL_S = 2.0


@dataclass(frozen=True)
class ServiceState:
    name: str
    component: str
    """Its `mlops.component` label."""
    update: str
    """Swarm's state of the service's last update, "" for a service never updated since it was created."""
    message: str
    running: int
    desired: int

    @property
    def in_progress(self) -> bool:
        return self.update in IN_PROGRESS or self.running < self.desired

    @property
    def refused(self) -> bool:
        return self.update in REFUSED

    def describe(self) -> str:
        update = f"update {self.update}" + (f" ({self.message})" if self.message else "") if self.update else "created"
        return f"{self.name}: {update}, {self.running}/{self.desired} tasks running"


def service_states(spec: StageSpec) -> list[ServiceState]:
    """Every service of the stage's stack, read from its swarm manager with the `docker` CLI."""
    environment = spec.docker.cli_environment()
    tasks = dict(line.split(" ", 1) for line in _docker(
        environment, "service", "ls", "--filter", f"label=mlops.stack={spec.stage}",
        "--format", "{{.Name}} {{.Replicas}}").splitlines())
    states = []
    for service in json.loads(_docker(environment, "service", "inspect", *tasks)) if tasks else []:
        name = service["Spec"]["Name"]
        # `running/desired`, e.g. `2/3` (a global service: one desired per eligible node), maybe followed by more.
        running, desired = map(int, tasks[name].split()[0].split("/"))
        update = service.get("UpdateStatus") or {}
        states.append(ServiceState(name=name, component=(service["Spec"].get("Labels") or {}).get(COMPONENT_LABEL, ""),
                                   update=update.get("State", ""), message=update.get("Message", ""),
                                   running=running, desired=desired))
    return sorted(states, key=lambda state: state.name)


def longest_update_s(spec: StageSpec) -> int:
    """The longest a rolling update of one of the stage's services may take, by the same reckoning as the
    provider's converge timeout (components/runtimes.py): its replicas one after another, each turning healthy
    and then watched for a monitor window."""
    serving = [converge_within_s(spec.serving.health_check, model.replicas) for model in spec.served_models()]
    single = [converge_within_s(check, 1) for check in (spec.model_registry.health_check,
                                                          spec.image_registry.health_check)]
    return max(serving + single)


@dataclass(frozen=True)
class Settled:
    services: list[ServiceState]
    timed_out: bool

    @property
    def ok(self) -> bool:
        return not self.timed_out and not any(state.refused for state in self.services)


def settle(spec: StageSpec, timeout_s: float, read: Optional[Callable[[StageSpec], list[ServiceState]]] = None,
           clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> Settled:
    """Read the stage's services (by `read`, default from its manager) until none is in progress, or `timeout_s`
    passed."""
    deadline = clock() + timeout_s
    while True:
        states = (read or service_states)(spec)
        if not any(state.in_progress for state in states):
            return Settled(states, timed_out=False)
        if clock() >= deadline:
            return Settled(states, timed_out=True)
        sleep(min(POLL_S, max(deadline - clock(), 0.0)))


@dataclass(frozen=True)
class SwarmSecret:
    id: str
    name: str


def mounted_secret_ids(services: Iterable[Mapping[str, Any]]) -> set[str]:
    """The secrets a service's spec or previous spec mounts, for every service given as `docker service inspect`
    shows it. Swarm refuses to remove a secret the spec mounts, not one only the previous spec does."""
    return {mounted["SecretID"] for service in services
            for task_spec in (service.get("Spec") or {}, service.get("PreviousSpec") or {})
            for mounted in (task_spec.get("TaskTemplate", {}).get("ContainerSpec", {}).get("Secrets") or [])}


def unmounted(secrets: Iterable[SwarmSecret], services: Iterable[Mapping[str, Any]]) -> list[SwarmSecret]:
    mounted = mounted_secret_ids(services)
    return sorted((secret for secret in secrets if secret.id not in mounted), key=lambda secret: secret.name)


@dataclass(frozen=True)
class Removal:
    secret: SwarmSecret
    refused: str
    """Why the manager kept it (a service mounted it meanwhile), "" when it is gone."""


def remove_unmounted_secrets(spec: StageSpec) -> list[Removal]:
    """Delete the stack's secrets that no service of the swarm mounts now or would roll back to. Every service
    counts, not only the stack's: a secret is the stack's by its label, its users need not be."""
    environment = spec.docker.cli_environment()
    listed = _docker(environment, "secret", "ls", "--filter", f"label=mlops.stack={spec.stage}",
                     "--format", "{{.ID}} {{.Name}}").split()
    secrets = [SwarmSecret(id=secret_id, name=name) for secret_id, name in zip(listed[::2], listed[1::2])]
    service_ids = _docker(environment, "service", "ls", "--quiet").split()
    services = json.loads(_docker(environment, "service", "inspect", *service_ids)) if service_ids else []
    removals = []
    for secret in unmounted(secrets, services):
        try:
            _docker(environment, "secret", "rm", secret.id)
            removals.append(Removal(secret, refused=""))
        except DockerError as refusal:
            removals.append(Removal(secret, refused=str(refusal)))
    return removals
