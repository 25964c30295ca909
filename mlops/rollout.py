"""The rollout of each model's green slot as the stack declares it and as a person watches it.

The gateway image runs the rollouts (images/gateway/canary.py: stdlib only, so it cannot import this
package), recording each model's in `rollout_folder(model)`; this module reads back what it recorded and puts
it beside the stage's Prometheus numbers as the rows `mlops status` shows, one per model and slot.
"""
from __future__ import annotations

import json
import subprocess
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

from mlops.reach import StageReach
from mlops_spec.contract import gateway_name, release_id, rollout_folder
from mlops_spec.models import ModelPin, RolloutPolicy, ServedModel, StageSpec

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
    """The rollout state the stage's gateway recorded for `model`, read through its Docker engine; None without
    one."""
    result = subprocess.run(["docker", "exec", gateway_name(stack), "cat", f"{rollout_folder(model)}/state.json"],
                            capture_output=True, text=True, check=False, env=spec.docker.cli_environment())
    if result.returncode != 0:
        return None
    try:
        return json.loads(result.stdout)
    except ValueError:
        return None


@dataclass(frozen=True)
class SlotRow:
    model: str
    slot: str
    version: str
    replicas: int
    weight: int
    error_rate: Optional[float]
    p99_ms: Optional[float]
    max_drift: Optional[float]
    rollout: str

    def cells(self) -> list[str]:
        def shown(value: Optional[float], form: str) -> str:
            return "-" if value is None else format(value, form)
        return [self.model, self.slot, self.version, str(self.replicas), f"{self.weight}%",
                shown(self.error_rate, ".2%"), shown(self.p99_ms, ".1f"), shown(self.max_drift, ".3f"), self.rollout]


COLUMNS = ["model", "slot", "version", "replicas", "weight", "errors (1m)", "p99 ms (1m)", "max drift (PSI)", "rollout"]


def _by_model_and_slot(query: Query, promql: str) -> dict[tuple[str, str], float]:
    return {(labels.get("model", ""), labels.get("slot", "")): value
            for labels, value in query(promql) if value == value}  # drops NaN


def rolling_out(model: ServedModel) -> Optional[tuple[ModelPin, RolloutPolicy]]:
    """The model's green and the policy the gateway rolls it out by, when it declares one."""
    green, pin = model.deployment.green, model.green_pin
    if green is None or green.rollout is None or pin is None:
        return None
    return pin, green.rollout


def _rollout_cell(model: ServedModel, state: Optional[dict]) -> str:
    rollout = rolling_out(model)
    if rollout is None:
        return "-"
    green, policy = rollout
    if state is None or state.get("green_release") != release_id(green):
        return "not started"
    where = f"step {state['step'] + 1}/{len(policy.steps)}"
    verdict = (state.get("last_judgement") or {}).get("verdict")
    return f"{state['phase']}, {where}" + (f", last judgement: {verdict}" if verdict else "")


def status_rows(spec: StageSpec, query: Query, states: Mapping[str, Optional[dict]]) -> list[SlotRow]:
    """One row per served model and slot: the pin, the replicas, the weight in force (the controller's when it
    runs the model's rollout, else the declared one), the gateway's error rate and p99 latency over the last
    minute, the highest drift score of its replicas, and where the rollout is. `states` holds the rollout state
    the gateway recorded for each model, by name."""
    errors = _by_model_and_slot(query, "mlops:gateway_errors:ratio_rate1m")
    p99 = _by_model_and_slot(query, "mlops:gateway_latency_seconds:p99_1m")
    drift = _by_model_and_slot(query, "max by (model, slot) (mlops:drift_psi:max)")
    rows = []
    for model in spec.served_models():
        state, green = states.get(model.name), model.green_pin
        green_weight = model.deployment.traffic.green
        if state is not None and green is not None and state.get("green_release") == release_id(green):
            green_weight = state["green_weight"]
        pins = {"blue": (model.pin, 100 - green_weight, "-")}
        if green is not None:
            pins["green"] = (green, green_weight, _rollout_cell(model, state))
        rows += [SlotRow(model=model.name, slot=slot, version=str(pin.version), replicas=model.replicas,
                         weight=weight, error_rate=errors.get((model.name, slot)),
                         p99_ms=p99[model.name, slot] * 1000 if (model.name, slot) in p99 else None,
                         max_drift=drift.get((model.name, slot)), rollout=rollout)
                 for slot, (pin, weight, rollout) in pins.items()]
    return rows


def stage_status(spec: StageSpec, stack: str) -> list[SlotRow]:
    """`status_rows` of a running stage: its Prometheus reached from here (no numbers without monitoring)
    and the rollout state its gateway recorded for each model it rolls out. Raises `PrometheusUnreachable` or
    `Unreachable`."""
    states = {model.name: gateway_state(spec, stack, model.name)
              for model in spec.served_models() if rolling_out(model) is not None}
    if spec.monitoring is None:
        return status_rows(spec, lambda promql: [], states)
    with StageReach(spec) as reach:
        return status_rows(spec, prometheus_query(prometheus_url(spec, reach)), states)
