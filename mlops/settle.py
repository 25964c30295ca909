"""Whether a swarm stage's services have settled after `pulumi up`, as Swarm itself reports it.

The provider's converge returns as soon as a service runs as many tasks as it declares, while Swarm keeps an
update in `updating` for one more `monitor` window and may still roll it back (kreuzwerker/terraform-provider-docker
`resource_docker_service_funcs.go`: the converge loop counts running tasks only; docs/day-two.md). A service whose
update Swarm rolled back runs the spec before the update, while the Pulumi state holds the new one, and the next
`pulumi up` without `--refresh` sees no difference. `settle` waits until no service of the stage is updating and
every one runs the tasks it declares, and reports every service Swarm rolled back or paused.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable, Optional

from components.runtimes import converge_within_s
from mlops.orphans import _docker
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
