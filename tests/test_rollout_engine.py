"""Automated canary analysis on a real engine: a stage with monitoring and a green slot under a rollout policy.

A green whose model fails on the requests it gets is rolled back to 100 % blue within the bake time, and no
request blue answers fails meanwhile; a healthy green is moved step by step to 100 %. One stage (a private
copy of dev) serves both, one after the other, with short bake times and one-second scrapes.
"""
from __future__ import annotations

import asyncio
import json
import pickle
import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from sklearn.datasets import load_iris
from sklearn.tree import DecisionTreeClassifier

from mlops.modelstore import BasicAuth
from mlops.rollout import gateway_state, stage_status
from mlops_spec.contract import TRAINER, derived_password, rollout_folder
from mlops_spec.loading import load_stages
from mlops_spec.project import ENVIRONMENTS_DIR
from tests.conftest import fetch_build_inputs, free_port
from tests.engine import StageOnEngine
from tests.test_gateway_failover import INFER_PATH, MlflowRest, model_that_in_replica_is, read_response

pytestmark = pytest.mark.docker

BAKE_TIME_S = 15
POLICY = {"steps": [10, 50, 100], "bake_time_s": BAKE_TIME_S, "max_error_rate_increase": 0.05,
          # Latency on a shared 2-core machine is noisy; this test is about errors.
          "max_p99_latency_ratio": 50.0, "min_requests": 10, "check_interval_s": 1}
# Sepal length above 7: the failing green model raises on it (a 422 at the gateway), blue predicts it.
ROW = [7.5, 3.0, 6.3, 2.1]
BODY = json.dumps({"inputs": [{"name": "input-0", "datatype": "FP64", "shape": [1, 4], "data": [ROW]}]}).encode()


def version_of(pin: dict) -> dict:
    """A registered version as a model's release or green names it."""
    return {"version": pin["version"], "sha256": pin["sha256"]}


def write_stage(environments, name: str, ports: dict[str, int], pins: dict[str, dict], green: str | None) -> None:
    """A private copy of dev with monitoring, blue (once registered) and green under the rollout policy."""
    spec = yaml.safe_load((environments / "dev.yaml").read_text())
    spec |= {
        "experiment": {"name": name, "owner": "tests", "source_stage": "dev",
                       "created_at": "2026-01-01T00:00:00Z", "expires_at": "2026-01-01T01:00:00Z"},
        "model_registry": {"port": {"host_port": ports["mlflow"]}},
        "monitoring": {"port": {"host_port": ports["prometheus"]}, "scrape_interval_s": 1, "evaluation_interval_s": 1},
        "serving": {**spec["serving"], "port": {"host_port": ports["gateway"]}},
    }
    # iris-classifier alone is served: its blue once registered, and its green; the other model is not served.
    iris: dict = {}
    if "blue" in pins:
        iris["release"] = version_of(pins["blue"])
    if green is not None:
        iris["green"] = {**version_of(pins[green]), "rollout": POLICY}
    spec["models"] = {"iris-classifier": iris, "diabetes-regressor": {}}
    (environments / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


@dataclass
class Stage:
    name: str
    environments: Path
    ports: dict[str, int]
    engine: StageOnEngine
    pins: dict[str, dict] = field(default_factory=dict)

    def deploy(self, green: str | None) -> None:
        write_stage(self.environments, self.name, self.ports, self.pins, green)
        self.engine.spec = load_stages([self.name], self.environments)[0]
        self.engine.deploy()

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['gateway']}"

    def state(self) -> dict | None:
        return gateway_state(self.engine.spec, self.name, "iris-classifier")

    def events(self) -> list[dict]:
        gateway = self.engine.client.containers.get(f"{self.name}-gateway")
        output = gateway.exec_run(["cat", f"{rollout_folder('iris-classifier')}/events.jsonl"]).output.decode()
        return [json.loads(line) for line in output.splitlines()]


@pytest.fixture(scope="module")
def stage(docker_engine, tmp_path_factory):
    fetch_build_inputs()
    environments = tmp_path_factory.mktemp("rollout") / "environments"
    shutil.copytree(ENVIRONMENTS_DIR, environments)
    name = f"t-roll-{uuid.uuid4().hex[:6]}"
    ports = {role: free_port() for role in ("mlflow", "gateway", "prometheus")}
    write_stage(environments, name, ports, {}, green=None)
    engine = StageOnEngine(stack=name, spec=load_stages([name], environments)[0], registry_password=uuid.uuid4().hex)
    created = Stage(name, environments, ports, engine)
    try:
        created.deploy(green=None)
        mlflow = MlflowRest(f"http://127.0.0.1:{ports['mlflow']}",
                            BasicAuth(TRAINER, derived_password(engine.mlflow_password, TRAINER)))
        mlflow.post("registered-models/create", name="iris-classifier")
        features, labels = load_iris(return_X_y=True)
        models = {"blue": pickle.dumps(DecisionTreeClassifier(random_state=0).fit(features, labels)),
                  "failing": model_that_in_replica_is("lambda features: 1 / 0 if (features[:, 0] > 7).any() else features"),
                  "healthy": pickle.dumps(DecisionTreeClassifier(random_state=1).fit(features, labels))}
        for role, payload in models.items():
            version, sha256 = mlflow.register("iris-classifier", payload)
            created.pins[role] = {"name": "iris-classifier", "version": int(version), "sha256": sha256}
        yield created
    finally:
        engine.teardown()


@dataclass
class Answers:
    """Every response under load: (seconds since the load started, pool that answered, HTTP status)."""

    started: float = field(default_factory=time.time)
    seen: list[tuple[float, str, int]] = field(default_factory=list)
    lost: Counter = field(default_factory=Counter)
    """Requests with no HTTP answer at all, by exception."""


async def load_until(url: str, answers: Answers, done, connections: int = 4) -> None:
    """Closed-loop keep-alive POSTs until `done()`; a dropped connection is a lost request, reopened."""
    host, port = url.removeprefix("http://").split(":")
    request = (f"POST {INFER_PATH} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(BODY)}\r\n\r\n").encode() + BODY

    async def client() -> None:
        stream = None
        while not done():
            try:
                if stream is None:
                    stream = await asyncio.open_connection(host, int(port))
                stream[1].write(request)
                status, headers, _ = await asyncio.wait_for(read_response(stream[0]), timeout=15)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as error:
                answers.lost[type(error).__name__] += 1
                if stream is not None:
                    stream[1].close()
                stream = None
                continue
            answers.seen.append((time.time(), headers.get("x-gateway-pool", "?"), status))
            if headers.get("connection") == "close":  # nginx ends a keep-alive connection every 1000 requests
                stream[1].close()
                stream = None
        if stream is not None:
            stream[1].close()

    await asyncio.gather(*(client() for _ in range(connections)))


def run_load_while(stage: Stage, until, timeout_s: float, then_s: float) -> Answers:
    """Load the gateway until `until(state)` holds (checked each second, at most `timeout_s`), then `then_s` more."""
    answers = Answers()
    finished: list[float] = []

    async def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = await asyncio.to_thread(stage.state)
            if state is not None and until(state):
                break
            await asyncio.sleep(1)
        await asyncio.sleep(then_s)
        finished.append(time.time())

    async def both() -> None:
        await asyncio.gather(watch(), load_until(stage.gateway_url, answers, lambda: bool(finished)))

    asyncio.run(both())
    return answers


def test_a_failing_canary_is_rolled_back_to_blue_within_the_bake_time_and_blue_loses_nothing(stage):
    stage.deploy(green="failing")
    answers = run_load_while(stage, lambda state: state["phase"] != "baking", timeout_s=4 * BAKE_TIME_S, then_s=5)
    state, events = stage.state(), stage.events()
    by_pool = Counter((pool, status) for _, pool, status in answers.seen)
    print(f"\nfailing canary: {dict(by_pool)}, lost {dict(answers.lost)}; events "
          f"{[(event['event'], event['green_weight'], round(event['time'] - events[0]['time'], 1)) for event in events]}")
    print("\n".join(json.dumps(event) for event in events[-2:]))
    assert (state["phase"], state["green_weight"]) == ("rolled back", 0)
    [first_step] = [event for event in events if event["event"] == "step"]
    [rollback] = [event for event in events if event["event"] == "rolled back"]
    assert first_step["green_weight"] == 10
    assert rollback["time"] - first_step["time"] <= BAKE_TIME_S, "rolled back later than the bake time"
    assert "green's error rate 100.00% is above blue's 0.00%" in rollback["reason"]
    judged = [event for event in events if event["event"] == "judgement"][-1]
    assert judged["verdict"] == "breach" and judged["green"]["requests"] >= POLICY["min_requests"]

    assert answers.lost == Counter(), "a request got no answer"
    assert {status for _, pool, status in answers.seen if pool == "blue"} == {200}, "blue lost requests"
    assert {status for _, pool, status in answers.seen if pool == "green"} == {422}
    # Requests sent a second after the rollback (the gateway follows the controller within its 2 s loop)
    # all went to blue.
    after = [pool for at, pool, _ in answers.seen if at > rollback["time"] + 2]
    assert after and set(after) == {"blue"}

    rows = {row.slot: row for row in stage_status(stage.engine.spec, stage.name)}
    assert (rows["blue"].weight, rows["green"].weight) == (100, 0)
    assert rows["green"].version == str(stage.pins["failing"]["version"])
    assert rows["green"].rollout == "rolled back, step 1/3, last judgement: breach"


def test_a_healthy_canary_reaches_100_percent_step_by_step(stage):
    stage.deploy(green="healthy")
    answers = run_load_while(stage, lambda state: state["phase"] != "baking", timeout_s=6 * BAKE_TIME_S, then_s=3)
    state, events = stage.state(), stage.events()
    print(f"\nhealthy canary: {dict(Counter((pool, status) for _, pool, status in answers.seen))}, lost "
          f"{dict(answers.lost)}; events {[(event['event'], event['green_weight']) for event in events]}")
    assert (state["phase"], state["green_weight"]) == ("finished", 100)
    assert state["green_release"].startswith(f"iris-classifier:{stage.pins['healthy']['version']}:")
    steps = [event for event in events if event["event"] == "step" and event["green_release"] == state["green_release"]]
    assert [step["green_weight"] for step in steps] == [10, 50, 100]
    assert all(later["time"] - earlier["time"] >= BAKE_TIME_S for earlier, later in zip(steps, steps[1:]))
    assert answers.lost == Counter() and {status for _, _, status in answers.seen} == {200}
    finished = next(event for event in events if event["event"] == "finished")
    after = [pool for at, pool, _ in answers.seen if at > finished["time"]]
    assert after and set(after) == {"green"}
