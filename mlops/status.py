"""Is a stage up, seen from outside? Every endpoint the stage publishes, probed from this machine as a user
reaches it (through `StageReach`: loopback, the tcp:// host's address or an SSH tunnel), next to the health
the stage's engine reports for the containers behind it.

On a swarm stage the containers are the services' tasks, on every node; the manager counts them: a task runs
only once its health check passed (Swarm holds it in `starting` until then), so a running task is a healthy one.

Both are needed: the engine's userland port proxy (docker-proxy, one process per published port) can die,
e.g. with "too many open files" above a few thousand connections, and leave a port dead while every
container behind it stays healthy; and a container can be unhealthy behind a port that still answers.

Each row comes from one function of `ROWS` taking the `Probe`. Under the endpoints, one row per served model
and slot (`mlops.rollout.status_rows`): its pin, replicas, the weight in force, error rate, p99 latency and
drift from the stage's Prometheus, and where an automated rollout is.
"""
from __future__ import annotations

import http.client
import json
import ssl
import time
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Optional

from mlops import rollout
from mlops.orphans import DockerError, _docker
from mlops.reach import StageReach, Unreachable
from mlops.settle import service_states
from mlops_spec.contract import COMPONENT_LABEL, SECRET_FILES_SUFFIX
from mlops_spec.models import PublishedPort, StageSpec

PROBE_TIMEOUT_S = 5.0
HEALTHY = "healthy"
NOT_RUNNING = "not running"
SERVING_COMPONENT = "model-serving"
# How a replica says why it will not serve its model (images/serving/serving/registry.py's ModelRefused), and how
# much of its log is read for it.
REFUSAL = "refusing model "
REFUSAL_LOG_LINES = "20"


@dataclass(frozen=True)
class Row:
    service: str
    address: str
    """Where the endpoint was probed, as this machine reaches it."""
    containers: str
    """What the engine says about the containers behind it, e.g. `2/2 healthy`."""
    answer: str
    latency_ms: Optional[float]
    ok: bool


@dataclass(frozen=True)
class Answer:
    status: Optional[int]
    """None when nothing answered; then `problem` says what happened."""
    latency_ms: Optional[float]
    problem: str = ""


class Probe:
    """What the row functions ask: the stage's spec, HTTP answers from its published ports, and the health of
    its containers by `mlops.component` label, read once from the stage's engine."""

    def __init__(self, spec: StageSpec, reach: StageReach) -> None:
        self.spec = spec
        self.reach = reach
        self._health, self.engine_problem, self.refusals = (_containers_health(spec) if spec.swarm is None
                                                            else _tasks_health(spec))

    def health(self, *components: str) -> list[str]:
        """Health of every container of `components`: `healthy`, `unhealthy`, `starting`, or the state of one
        without a health check (`running`, `exited`...)."""
        return [health for component in components for health in self._health.get(component, [])]

    def get(self, service: str, port: PublishedPort, path: str, tls: bool = False) -> tuple[str, Answer]:
        """(address, answer) of `GET path` on `service`'s published `port`, as a user's client sends it; over TLS
        where the service speaks it. The probe sends no credentials and reads no secret, so it does not verify the
        certificate (the stage's CA derives from a secret): it asks whether the service answers, not who it is."""
        try:
            address = self.reach.address(service, port)
        except Unreachable as err:
            return "-", Answer(None, None, f"unreachable from here: {err}")
        host, _, number = address.rpartition(":")
        connection = (http.client.HTTPSConnection(host, int(number), timeout=PROBE_TIMEOUT_S,
                                                  context=ssl._create_unverified_context()) if tls
                      else http.client.HTTPConnection(host, int(number), timeout=PROBE_TIMEOUT_S))
        started = time.monotonic()
        try:
            connection.request("GET", path)
            status = connection.getresponse().status
        except (OSError, http.client.HTTPException) as err:
            reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
            return address, Answer(None, None, f"no answer: {reason}")
        finally:
            connection.close()
        return address, Answer(status, round((time.monotonic() - started) * 1000, 1))


def _containers_health(spec: StageSpec) -> tuple[dict[str, list[str]], str, list[str]]:
    """component -> health of each of the stage's containers, why the engine could not say, if so, and what each
    replica that is not healthy last said refusing its model (`NAME: refusing model M vN: why`)."""
    environment = spec.docker.cli_environment()
    try:
        ids = _docker(environment, "container", "ls", "--all", "--quiet",
                      "--filter", f"label=mlops.stack={spec.stage}").split()
        inspected = json.loads(_docker(environment, "container", "inspect", *ids)) if ids else []
    except DockerError as err:
        return {}, f"engine at {spec.docker.url} did not answer: {err}", []
    health: dict[str, list[str]] = {}
    refusals = []
    for container in inspected:
        if container["Name"].endswith(SECRET_FILES_SUFFIX):
            continue  # created to write a workload's secret files, and never started
        state = container["State"]
        component = (container["Config"]["Labels"] or {}).get(COMPONENT_LABEL, "")
        running = state["Status"] == "running"
        status = state["Health"]["Status"] if running and state.get("Health") else state["Status"]
        health.setdefault(component, []).append(status)
        if component == SERVING_COMPONENT and status != HEALTHY and (refusal := _refusal(environment, container)):
            refusals.append(f"{container['Name'].lstrip('/')}: {refusal}")
    return health, "", refusals


def _refusal(environment: Mapping[str, str], container: dict) -> str:
    """The last refusal of its model in a replica's log, if it logged one."""
    try:
        logs = _docker(environment, "logs", "--tail", REFUSAL_LOG_LINES, container["Id"])
    except DockerError:
        return ""
    refusals = [line[line.index(REFUSAL):] for line in logs.splitlines() if REFUSAL in line]
    return refusals[-1] if refusals else ""


def _tasks_health(spec: StageSpec) -> tuple[dict[str, list[str]], str, list[str]]:
    """component -> one entry per task the stage's services should run (`healthy` for a running one), and why the
    manager could not say, if so; a task's log is not read (Swarm reports why it failed as its exit code)."""
    try:
        services = service_states(spec)
    except DockerError as err:
        return {}, f"engine at {spec.docker.url} did not answer: {err}", []
    health: dict[str, list[str]] = {}
    for service in services:
        health.setdefault(service.component, []).extend(
            [HEALTHY] * service.running + [NOT_RUNNING] * max(service.desired - service.running, 0))
    return health, "", []


def _summary(healths: list[str], engine_problem: str) -> tuple[str, bool]:
    if engine_problem:
        return "unknown", False
    if not healths:
        return "no container", False
    healthy = healths.count(HEALTHY)
    others = sorted({health for health in healths if health != HEALTHY})
    summary = f"{healthy}/{len(healths)} {HEALTHY}" + (f" ({', '.join(others)})" if others else "")
    return summary, healthy == len(healths)


def _endpoint_row(probe: Probe, service: str, port: PublishedPort, path: str, expected: set[int],
                  components: tuple[str, ...], tls: bool = False) -> Row:
    address, answer = probe.get(service, port, path, tls)
    containers, healthy = _summary(probe.health(*components), probe.engine_problem)
    if answer.status is None:
        text, answered = answer.problem, False
    else:
        answered = answer.status in expected
        text = f"GET {path}: {answer.status}" + ("" if answered else f" (expected {'/'.join(map(str, sorted(expected)))})")
    return Row(service, address, containers, text, answer.latency_ms, answered and healthy)


def gateway(probe: Probe) -> Optional[Row]:
    """The serving gateway is ready only when a replica behind it is (Open Inference Protocol readiness)."""
    if not probe.spec.served_models():
        return None  # nothing promoted yet: the stage serves nothing and publishes no gateway port
    return _endpoint_row(probe, "gateway", probe.spec.serving.port, "/v2/health/ready", {200},
                         ("serving-gateway", SERVING_COMPONENT))


def model_registry(probe: Probe) -> Optional[Row]:
    # /health is MLflow's one path that needs no user, so the probe needs no secret.
    port = probe.spec.model_registry.port
    return _endpoint_row(probe, "model registry", port, "/health", {200}, ("model-registry",), tls=port.off_loopback)


def image_registry(probe: Probe) -> Optional[Row]:
    if not probe.spec.image_registry.enabled:
        return None
    # The distribution API's base endpoint: 401 is its answer to a client without credentials.
    port = probe.spec.image_registry.port
    return _endpoint_row(probe, "image registry", port, "/v2/", {200, 401}, ("image-registry",), tls=port.off_loopback)


def monitoring(probe: Probe) -> Optional[Row]:
    if probe.spec.monitoring is None:
        return None
    return _endpoint_row(probe, "Prometheus", probe.spec.monitoring.port, "/-/ready", {200}, ("monitoring",))


ROWS: tuple[Callable[[Probe], Optional[Row]], ...] = (gateway, model_registry, image_registry, monitoring)


@dataclass(frozen=True)
class StageStatus:
    stage: str
    docker_host: str
    rows: list[Row]
    engine_problem: str
    slots: list[rollout.SlotRow]
    slots_problem: str
    """Why the slots' numbers are missing, if they are (the endpoint rows say whether that is a fault)."""
    refusals: list[str]
    """Each replica that is not healthy because it refused its model, with the reason it logged."""

    @property
    def ok(self) -> bool:
        return not self.engine_problem and all(row.ok for row in self.rows)

    def to_json(self) -> dict:
        return {"stage": self.stage, "docker_host": self.docker_host, "ok": self.ok,
                "engine_problem": self.engine_problem or None, "rows": [asdict(row) for row in self.rows],
                "slots": [asdict(slot) for slot in self.slots], "slots_problem": self.slots_problem or None,
                "refusals": self.refusals}


def stage_status(spec: StageSpec) -> StageStatus:
    with StageReach(spec) as reach:
        probe = Probe(spec, reach)
        rows = [row for check in ROWS if (row := check(probe)) is not None]
    try:
        slots, slots_problem = rollout.stage_status(spec, spec.stage), ""
    except (rollout.PrometheusUnreachable, Unreachable) as err:
        slots, slots_problem = rollout.status_rows(spec, lambda promql: [], {}), f"no numbers from Prometheus: {err}"
    return StageStatus(spec.stage, spec.docker.url, rows, probe.engine_problem, slots, slots_problem, probe.refusals)
