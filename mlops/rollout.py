"""The rollout of a green slot as the stack declares it and as a person watches it.

The gateway image runs the rollout (images/gateway/canary.py: stdlib only, so it cannot import this
package); this module renders what the gateway is given, reads back what it recorded, and puts both beside
the stage's Prometheus numbers as the rows `mlops status` shows.
"""
from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Callable, Optional

from mlops.reach import StageReach
from mlops_spec.contract import gateway_name, release_id, rollout_folder
from mlops_spec.models import StageSpec

FINISHED = "finished"
"""The phase images/gateway/canary.py records once green baked at 100 % within the limits."""
PROMETHEUS_TIMEOUT_S = 5.0

Query = Callable[[str], list[tuple[dict[str, str], float]]]
"""An instant PromQL query: (labels, value) of each series."""


class PrometheusUnreachable(Exception):
    """The stage's Prometheus did not answer a query; the message says which and why."""


def prometheus_query(base_url: str) -> Query:
    def query(promql: str) -> list[tuple[dict[str, str], float]]:
        url = f"{base_url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
        try:
            with urllib.request.urlopen(url, timeout=PROMETHEUS_TIMEOUT_S) as response:
                answer = json.load(response)
        except (OSError, ValueError) as error:
            raise PrometheusUnreachable(f"Prometheus at {base_url} did not answer: {error}") from None
        if answer.get("status") != "success":
            raise PrometheusUnreachable(f"Prometheus at {base_url} refused the query: {answer.get('error')}")
        return [(series["metric"], float(series["value"][1])) for series in answer["data"]["result"]]
    return query


def prometheus_url(spec: StageSpec, reach: StageReach) -> str:
    """The stage's Prometheus as reached from here; the stage must declare `monitoring`."""
    assert spec.monitoring is not None
    return f"http://{reach.address('Prometheus', spec.monitoring.port)}"


def gateway_state(spec: StageSpec, stack: str, model: str) -> Optional[dict]:
    """The rollout state the stage's gateway recorded for `model`, read through its Docker engine; None without one."""
    result = subprocess.run(["docker", "--host", spec.docker.url, "exec", gateway_name(stack), "cat",
                             f"{rollout_folder(model)}/state.json"],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0:
        return None
    try:
        return json.loads(result.stdout)
    except ValueError:
        return None


@dataclass(frozen=True)
class SlotRow:
    slot: str
    model: str
    version: str
    weight: int
    error_rate: Optional[float]
    p99_ms: Optional[float]
    max_drift: Optional[float]
    rollout: str

    def cells(self) -> list[str]:
        def shown(value: Optional[float], form: str) -> str:
            return "-" if value is None else format(value, form)
        return [self.slot, self.model, self.version, f"{self.weight}%", shown(self.error_rate, ".2%"),
                shown(self.p99_ms, ".1f"), shown(self.max_drift, ".3f"), self.rollout]


COLUMNS = ["slot", "model", "version", "weight", "errors (1m)", "p99 ms (1m)", "max drift (PSI)", "rollout"]


def _by_slot(query: Query, promql: str) -> dict[str, float]:
    return {labels.get("slot", ""): value for labels, value in query(promql) if value == value}  # drops NaN


def _rollout_cell(spec: StageSpec, state: Optional[dict]) -> str:
    green = spec.serving.green
    if green is None or green.rollout is None:
        return "-"
    if state is None or state.get("green_release") != release_id(green.model):
        return "not started"
    steps = green.rollout.steps
    where = f"step {state['step'] + 1}/{len(steps)}"
    verdict = (state.get("last_judgement") or {}).get("verdict")
    return f"{state['phase']}, {where}" + (f", last judgement: {verdict}" if verdict else "")


def status_rows(spec: StageSpec, query: Query, state: Optional[dict]) -> list[SlotRow]:
    """One row per slot: the pin, the weight in force (the controller's when it runs a rollout, else the
    declared one), the gateway's error rate and p99 latency over the last minute, the highest drift score
    of its replicas, and where the rollout is."""
    if spec.release is None:
        return []
    model = f'{{model="{spec.release.model.name}"}}'
    errors = _by_slot(query, f"mlops:gateway_errors:ratio_rate1m{model}")
    p99 = _by_slot(query, f"mlops:gateway_latency_seconds:p99_1m{model}")
    drift = _by_slot(query, f"max by (slot) (mlops:drift_psi:max{model})")
    green_weight = spec.serving.traffic.green
    if state is not None and spec.serving.green is not None and state.get("green_release") == release_id(spec.serving.green.model):
        green_weight = state["green_weight"]
    pins = {"blue": (spec.release.model, 100 - green_weight, "-")}
    if spec.serving.green is not None:
        pins["green"] = (spec.serving.green.model, green_weight, _rollout_cell(spec, state))
    return [SlotRow(slot=slot, model=pin.name, version=str(pin.version), weight=weight, error_rate=errors.get(slot),
                    p99_ms=p99[slot] * 1000 if slot in p99 else None, max_drift=drift.get(slot), rollout=rollout)
            for slot, (pin, weight, rollout) in pins.items()]


def stage_status(spec: StageSpec, stack: str) -> list[SlotRow]:
    """`status_rows` of a running stage: its Prometheus reached from here (no numbers without monitoring)
    and the rollout state its gateway recorded. Raises `PrometheusUnreachable` or `Unreachable`."""
    state = gateway_state(spec, stack)
    if spec.monitoring is None:
        return status_rows(spec, lambda promql: [], state)
    with StageReach(spec) as reach:
        return status_rows(spec, prometheus_query(prometheus_url(spec, reach)), state)
