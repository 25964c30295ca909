"""Automated canary analysis, run by the gateway: moves green's weight through the declared steps and sends
all traffic back to blue as soon as green breaks a limit, judged from Prometheus.

Stdlib only, like gateway.py. Each model with a rollout gets a controller of its own: its policy comes in
GATEWAY_MODELS (rendered from the stage file's `serving.green.rollout`); what it does goes to an event log (JSON
lines) and a state file in `ROLLOUT_DIR/<model>/`, on a volume of the artifact store, so a restarted gateway
resumes where it was and never rolls out again a green it rolled back.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Optional

log = logging.getLogger("gateway.canary")

QUERY_TIMEOUT_S = 2.0
# Prometheus' increase() and histogram_quantile() need two scrapes inside the window; four leave room for a
# late or missed one.
SCRAPES_PER_WINDOW = 4
# The gateway's metrics (components/monitoring.py scrapes them): requests by model, slot and status, and their
# latency histogram by model and slot. Only the gateway's scrape job counts: any other target (a replica's metrics port
# serves what its code registers) could export series of the same names and steer the rollout.
GATEWAY_JOB = 'job="gateway"'
REQUESTS = "mlops_gateway_requests_total"
LATENCY_BUCKETS = "mlops_gateway_request_duration_seconds_bucket"
# What counts against green: the gateway's own failures and the model's (422: a prediction that fails on
# this input but not on others, as a model that breaks on a feature range does).
FAILED = 'code=~"5..|422"'

BAKING, FINISHED, ROLLED_BACK = "baking", "finished", "rolled back"


class PolicyError(Exception):
    pass


@dataclass(frozen=True)
class Policy:
    steps: tuple[int, ...]
    bake_time_s: float
    max_error_rate_increase: float
    max_p99_latency_ratio: float
    min_requests: int
    check_interval_s: float

    @classmethod
    def from_fields(cls, fields: object, where: str) -> "Policy":
        """The policy `fields` (a JSON object) declare; `where` names them in the error."""
        try:
            assert isinstance(fields, dict), f"expected an object, got {fields!r:.100}"
            policy = cls(**{**fields, "steps": tuple(fields["steps"])})
        except (AssertionError, TypeError, KeyError) as error:
            raise PolicyError(f"{where}: not a rollout policy: {error}") from None
        if not policy.steps or list(policy.steps) != sorted(set(policy.steps)) or policy.steps[-1] != 100:
            raise PolicyError(f"{where}: rollout steps must increase strictly to 100, got {list(policy.steps)}")
        return policy


@dataclass(frozen=True)
class RolloutDeclaration:
    """One model's rollout as GATEWAY_MODELS declares it."""

    policy: Policy
    green_release: str
    """The green slot's model pin (`name:version:sha256`); a state recorded for another green is not resumed."""


@dataclass(frozen=True)
class SlotSample:
    """One slot's traffic over the judged window."""

    requests: float
    error_rate: Optional[float]
    p99_s: Optional[float]


@dataclass(frozen=True)
class Judgement:
    verdict: str
    """"breach", "healthy" or "too few requests"."""
    reason: str
    green: SlotSample
    blue: SlotSample


def judge(policy: Policy, green: SlotSample, blue: SlotSample) -> Judgement:
    """Green against blue (or, once blue gets no traffic, against blue's last judged numbers)."""
    if green.requests < policy.min_requests:
        return Judgement("too few requests", f"green answered {green.requests:.0f} of the {policy.min_requests} "
                                             "requests needed to judge it", green, blue)
    allowed_errors = (blue.error_rate or 0.0) + policy.max_error_rate_increase
    if green.error_rate is not None and green.error_rate > allowed_errors:
        return Judgement("breach", f"green's error rate {green.error_rate:.2%} is above blue's "
                                   f"{blue.error_rate or 0.0:.2%} + {policy.max_error_rate_increase:.2%}", green, blue)
    if green.p99_s is not None and blue.p99_s is not None and green.p99_s > blue.p99_s * policy.max_p99_latency_ratio:
        return Judgement("breach", f"green's p99 latency {green.p99_s * 1000:.1f} ms is above "
                                   f"{policy.max_p99_latency_ratio}x blue's {blue.p99_s * 1000:.1f} ms", green, blue)
    return Judgement("healthy", "within the limits", green, blue)


@dataclass(frozen=True)
class RolloutState:
    green_release: str
    """The green slot's model pin; a state of another green is not resumed."""
    phase: str
    step: int
    """Index into the policy's steps; -1 before the first."""
    green_weight: int
    step_started: float
    last_judgement: Optional[dict] = None
    baseline: Optional[dict] = None
    """Blue's last judged sample with traffic, the reference once green gets all of it."""


class PrometheusError(Exception):
    pass


def prometheus_query(base_url: str, promql: str) -> dict[str, float]:
    """An instant query's value per `slot` label (NaN left out)."""
    url = f"{base_url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    try:
        with urllib.request.urlopen(url, timeout=QUERY_TIMEOUT_S) as response:
            answer = json.load(response)
    except (OSError, ValueError) as error:
        raise PrometheusError(f"{base_url}: {error}") from None
    if answer.get("status") != "success":
        raise PrometheusError(f"{base_url}: {answer.get('error', 'query failed')}")
    values = {}
    for series in answer["data"]["result"]:
        value = float(series["value"][1])
        if not math.isnan(value):
            values[series["metric"].get("slot", "")] = value
    return values


def sample_slots(query: Callable[[str], dict[str, float]], model: str, window_s: int,
                 scrape_interval_s: int) -> dict[str, SlotSample]:
    """Each slot of `model` over the window, from the gateway's own series of that model."""
    window = f"{max(window_s, SCRAPES_PER_WINDOW * scrape_interval_s)}s"
    # Model names hold no quote or backslash (gateway.MODEL_NAME), so they go into the selector as they are.
    selector = f'{GATEWAY_JOB},model="{model}"'
    requests = query(f"sum by (slot) (increase({REQUESTS}{{{selector}}}[{window}]))")
    failed = query(f"sum by (slot) (increase({REQUESTS}{{{selector},{FAILED}}}[{window}]))")
    p99 = query(f"histogram_quantile(0.99, sum by (slot, le) (rate({LATENCY_BUCKETS}{{{selector}}}[{window}])))")
    samples = {}
    for slot in ("blue", "green"):
        count = requests.get(slot, 0.0)
        # increase() extrapolates each series to the window's edges on its own, so the ratio of two can
        # come out a hair above 1.
        error_rate = min(failed.get(slot, 0.0) / count, 1.0) if count else None
        samples[slot] = SlotSample(requests=count, error_rate=error_rate, p99_s=p99.get(slot))
    return samples


class EventLog:
    """A model's rollout record on the artifact store: `events.jsonl` (appended) and `state.json` (replaced
    atomically), in a folder of that model's."""

    def __init__(self, folder: Path, model: str) -> None:
        self.folder = folder
        self.model = model
        self.events = folder / "events.jsonl"
        self.state_file = folder / "state.json"

    def record(self, event: str, state: RolloutState, **details: object) -> None:
        entry = {"time": time.time(), "event": event, "green_release": state.green_release,
                 "green_weight": state.green_weight, "step": state.step, **details}
        log.info("rollout of %s %s: %s", self.model, event, json.dumps(details))
        with self.events.open("a") as events:
            events.write(json.dumps(entry) + "\n")

    def save(self, state: RolloutState) -> None:
        temporary = self.state_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(asdict(state)))
        os.replace(temporary, self.state_file)

    def load(self, green_release: str) -> Optional[RolloutState]:
        try:
            state = RolloutState(**json.loads(self.state_file.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        return state if state.green_release == green_release else None


@dataclass
class Controller:
    """The rollout as a state machine: `tick` answers green's weight. The gateway's loop calls it every
    RESOLVE_INTERVAL_S (2 s), so a check interval below that is checked every 2 s."""

    policy: Policy
    green_release: str
    declared_green_weight: int
    record: EventLog
    sample: Callable[[int], dict[str, SlotSample]]
    clock: Callable[[], float] = time.time
    state: RolloutState = field(init=False)
    last_check: float = field(init=False, default=-math.inf)

    def __post_init__(self) -> None:
        resumed = self.record.load(self.green_release)
        if resumed is not None:
            # A restarted gateway bakes its current step again from the start: the old window is gone.
            self.state = replace(resumed, step_started=self.clock())
            self.record.record("resumed", self.state, phase=self.state.phase)
        else:
            self.state = RolloutState(self.green_release, BAKING, -1, self.declared_green_weight, self.clock())
            self.record.record("started", self.state, steps=list(self.policy.steps),
                               bake_time_s=self.policy.bake_time_s)
            self._enter_step(0)
        self.record.save(self.state)

    @property
    def green_weight(self) -> int:
        return self.state.green_weight

    def _enter_step(self, step: int) -> None:
        self.state = replace(self.state, step=step, green_weight=self.policy.steps[step], step_started=self.clock())
        self.record.record("step", self.state, phase=BAKING)

    def tick(self) -> int:
        now = self.clock()
        if self.state.phase != BAKING or now - self.last_check < self.policy.check_interval_s:
            return self.green_weight
        self.last_check = now
        baked_s = now - self.state.step_started
        try:
            samples = self.sample(math.ceil(baked_s))
        except PrometheusError as error:
            # No data is no verdict: the step waits (its bake time counts on) until Prometheus answers.
            log.warning("rollout of %s: cannot judge green: %s", self.record.model, error)
            return self.green_weight
        blue = samples["blue"]
        if blue.requests == 0 and self.state.baseline is not None:
            blue = SlotSample(**self.state.baseline)
        judgement = judge(self.policy, samples["green"], blue)
        numbers = {"verdict": judgement.verdict, "reason": judgement.reason, "green": asdict(judgement.green),
                   "blue": asdict(judgement.blue), "baked_s": round(baked_s, 1)}
        self.state = replace(self.state, last_judgement=numbers,
                             baseline=asdict(samples["blue"]) if samples["blue"].requests else self.state.baseline)
        if judgement.verdict == "breach":
            self.record.record("judgement", self.state, **numbers)
            self.state = replace(self.state, phase=ROLLED_BACK, green_weight=0)
            self.record.record("rolled back", self.state, reason=judgement.reason)
        elif baked_s >= self.policy.bake_time_s and judgement.verdict == "healthy":
            self.record.record("judgement", self.state, **numbers)
            if self.state.step + 1 < len(self.policy.steps):
                self._enter_step(self.state.step + 1)
            else:
                self.state = replace(self.state, phase=FINISHED)
                self.record.record("finished", self.state, reason="green baked at 100% within the limits; "
                                                                  "`mlops promote` makes it the new blue")
        self.record.save(self.state)
        return self.green_weight


def controllers_from_env(env: Mapping[str, str], rollouts: Mapping[str, tuple[RolloutDeclaration, int]]) -> dict[str, Controller]:
    """A controller per model of `rollouts` (model -> its rollout and green's declared weight), each recording in
    `ROLLOUT_DIR/<model>/`, all judged by the one Prometheus the environment names."""
    if not rollouts:
        return {}
    for variable in ("PROMETHEUS_URL", "SCRAPE_INTERVAL_S", "ROLLOUT_DIR"):
        if not env.get(variable):
            raise PolicyError(f"a rollout ({', '.join(rollouts)}) needs {variable}")
    if not env["SCRAPE_INTERVAL_S"].isdigit():
        raise PolicyError(f"SCRAPE_INTERVAL_S must be a number of seconds, got {env['SCRAPE_INTERVAL_S']!r}")
    if not os.access(env["ROLLOUT_DIR"], os.W_OK):
        raise PolicyError(f"ROLLOUT_DIR {env['ROLLOUT_DIR']} is not a writable folder: the rollout records every "
                          "step there, so mount the stage's rollout volume on it")
    prometheus, scrape_interval_s = env["PROMETHEUS_URL"].rstrip("/"), int(env["SCRAPE_INTERVAL_S"])

    def sampler(model: str) -> Callable[[int], dict[str, SlotSample]]:
        return lambda window_s: sample_slots(lambda promql: prometheus_query(prometheus, promql), model, window_s,
                                             scrape_interval_s)

    controllers = {}
    for model, (rollout, declared_green_weight) in rollouts.items():
        folder = Path(env["ROLLOUT_DIR"]) / model
        folder.mkdir(exist_ok=True)
        controllers[model] = Controller(policy=rollout.policy, green_release=rollout.green_release,
                                        declared_green_weight=declared_green_weight, record=EventLog(folder, model),
                                        sample=sampler(model))
    return controllers
