"""The gateway's rollout controller in-process: steps, judgements, rollback, its record and the routing it drives."""
from __future__ import annotations

import json
import sys

import pytest

from mlops_spec.project import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "images" / "gateway"))
from canary import (  # noqa: E402
    BAKING,
    FINISHED,
    ROLLED_BACK,
    Controller,
    EventLog,
    Policy,
    PolicyError,
    PrometheusError,
    RolloutDeclaration,
    SlotSample,
    controllers_from_env,
    judge,
    sample_slots,
)
from gateway import Gateway, models_from_env, render  # noqa: E402

POLICY = Policy(steps=(10, 50, 100), bake_time_s=30, max_error_rate_increase=0.01, max_p99_latency_ratio=1.5,
                min_requests=20, check_interval_s=5)
HEALTHY = {"blue": SlotSample(requests=900, error_rate=0.0, p99_s=0.010),
           "green": SlotSample(requests=100, error_rate=0.0, p99_s=0.012)}
FAILING = {**HEALTHY, "green": SlotSample(requests=100, error_rate=0.30, p99_s=0.012)}
SLOW = {**HEALTHY, "green": SlotSample(requests=100, error_rate=0.0, p99_s=0.020)}
QUIET = {**HEALTHY, "green": SlotSample(requests=5, error_rate=0.0, p99_s=0.012)}
ALL_GREEN = {"blue": SlotSample(requests=0, error_rate=None, p99_s=None),
             "green": SlotSample(requests=1000, error_rate=0.0, p99_s=0.012)}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Traffic:
    """What Prometheus answers next, and the windows the controller asked for."""

    def __init__(self, samples: dict[str, SlotSample]) -> None:
        self.samples = samples
        self.windows: list[int] = []

    def __call__(self, window_s: int) -> dict[str, SlotSample]:
        self.windows.append(window_s)
        if isinstance(self.samples, Exception):
            raise self.samples
        return self.samples


def controller(tmp_path, traffic: Traffic, clock: Clock, release: str = "iris-classifier:2") -> Controller:
    return Controller(policy=POLICY, green_release=release, declared_green_weight=0,
                      record=EventLog(tmp_path, "iris-classifier"), sample=traffic, clock=clock)


def run_for(rollout: Controller, clock: Clock, seconds: float) -> list[int]:
    weights = []
    for _ in range(int(seconds // POLICY.check_interval_s)):
        clock.now += POLICY.check_interval_s
        weights.append(rollout.tick())
    return weights


def events(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]


def test_a_healthy_green_moves_step_by_step_after_each_bake_time_to_100(tmp_path):
    clock, traffic = Clock(), Traffic(HEALTHY)
    rollout = controller(tmp_path, traffic, clock)
    assert rollout.green_weight == 10
    weights = run_for(rollout, clock, 30)
    assert weights == [10] * 5 + [50], "a step lasts its bake time, then moves on"
    weights = run_for(rollout, clock, 30)
    assert weights[-1] == 100
    traffic.samples = ALL_GREEN  # blue gets nothing at 100%: green is judged against blue's last numbers
    run_for(rollout, clock, 30)
    assert (rollout.state.phase, rollout.green_weight) == (FINISHED, 100)
    assert rollout.state.baseline == {"requests": 900, "error_rate": 0.0, "p99_s": 0.010}
    record = events(tmp_path)
    assert [entry["event"] for entry in record] == ["started", "step", "judgement", "step", "judgement", "step",
                                                    "judgement", "finished"]
    assert [entry["green_weight"] for entry in record if entry["event"] == "step"] == [10, 50, 100]
    assert record[2]["green"] == {"requests": 100, "error_rate": 0.0, "p99_s": 0.012}
    assert record[2]["verdict"] == "healthy" and record[2]["baked_s"] == 30
    assert traffic.windows[:6] == [5, 10, 15, 20, 25, 30], "each step is judged on its own traffic"


@pytest.mark.parametrize("samples, reason", [
    (FAILING, "green's error rate 30.00% is above blue's 0.00% + 1.00%"),
    (SLOW, "green's p99 latency 20.0 ms is above 1.5x blue's 10.0 ms"),
])
def test_a_breach_returns_all_traffic_to_blue_at_the_next_check_and_records_why(tmp_path, samples, reason):
    clock, traffic = Clock(), Traffic(HEALTHY)
    rollout = controller(tmp_path, traffic, clock)
    run_for(rollout, clock, 30)
    traffic.samples = samples
    assert run_for(rollout, clock, 5) == [0]
    assert rollout.state.phase == ROLLED_BACK
    assert run_for(rollout, clock, 120) == [0] * 24, "a rolled-back green stays at 0"
    last = events(tmp_path)[-2:]
    assert [entry["event"] for entry in last] == ["judgement", "rolled back"]
    assert last[0]["verdict"] == "breach" and last[0]["green"] == {"requests": 100, **{
        key: value for key, value in vars(samples["green"]).items() if key != "requests"}}
    assert last[1]["reason"] == reason and last[1]["green_weight"] == 0


def test_green_is_not_judged_nor_moved_on_before_it_answered_the_floor_of_requests(tmp_path):
    clock, traffic = Clock(), Traffic(QUIET)
    rollout = controller(tmp_path, traffic, clock)
    assert run_for(rollout, clock, 120) == [10] * 24
    assert rollout.state.last_judgement["verdict"] == "too few requests"
    assert rollout.state.last_judgement["reason"] == "green answered 5 of the 20 requests needed to judge it"
    traffic.samples = {**QUIET, "green": SlotSample(requests=5, error_rate=1.0, p99_s=1.0)}
    assert run_for(rollout, clock, 5) == [10], "5 failed requests are below the floor: no verdict either way"


def test_without_prometheus_the_step_waits_for_an_answer(tmp_path):
    clock, traffic = Clock(), Traffic(PrometheusError("http://prometheus:9090: timed out"))
    rollout = controller(tmp_path, traffic, clock)
    assert run_for(rollout, clock, 60) == [10] * 12
    traffic.samples = HEALTHY
    assert run_for(rollout, clock, 5) == [50], "the bake time counted on while Prometheus was away"


def test_a_restarted_gateway_resumes_and_never_rolls_out_a_rolled_back_green_again(tmp_path):
    clock, traffic = Clock(), Traffic(FAILING)
    run_for(controller(tmp_path, traffic, clock), clock, 5)
    resumed = controller(tmp_path, Traffic(HEALTHY), clock)
    assert (resumed.state.phase, resumed.green_weight) == (ROLLED_BACK, 0)
    assert events(tmp_path)[-1]["event"] == "resumed"
    other = controller(tmp_path, Traffic(HEALTHY), clock, release="iris-classifier:3")
    assert (other.state.phase, other.green_weight) == (BAKING, 10), "a new green gets its own rollout"
    assert json.loads((tmp_path / "state.json").read_text())["green_release"] == "iris-classifier:3"


def test_each_slot_is_sampled_from_the_gateway_metrics_of_its_model_over_at_least_four_scrapes():
    selector = 'job="gateway",model="iris-classifier"'
    answers = {
        f"sum by (slot) (increase(mlops_gateway_requests_total{{{selector}}}[20s]))": {"blue": 180.0, "green": 20.0},
        f'sum by (slot) (increase(mlops_gateway_requests_total{{{selector},code=~"5..|422"}}[20s]))': {"green": 5.0},
        "histogram_quantile(0.99, sum by (slot, le) (rate(mlops_gateway_request_duration_seconds_bucket"
        f"{{{selector}}}[20s])))": {"blue": 0.01, "green": 0.05},
    }
    samples = sample_slots(answers.__getitem__, "iris-classifier", window_s=3, scrape_interval_s=5)
    assert samples == {"blue": SlotSample(requests=180.0, error_rate=0.0, p99_s=0.01),
                       "green": SlotSample(requests=20.0, error_rate=0.25, p99_s=0.05)}
    answers[f'sum by (slot) (increase(mlops_gateway_requests_total{{{selector},code=~"5..|422"}}[20s]))'] = {"green": 20.01}
    assert sample_slots(answers.__getitem__, "iris-classifier", window_s=3, scrape_interval_s=5)["green"].error_rate == 1.0
    silent = sample_slots(lambda promql: {}, "iris-classifier", window_s=60, scrape_interval_s=5)
    assert silent["green"] == SlotSample(requests=0.0, error_rate=None, p99_s=None)


def test_judge_compares_green_with_blue():
    assert judge(POLICY, HEALTHY["green"], HEALTHY["blue"]).verdict == "healthy"
    within = SlotSample(requests=100, error_rate=0.019, p99_s=0.015)
    assert judge(POLICY, within, SlotSample(requests=900, error_rate=0.01, p99_s=0.010)).verdict == "healthy"
    assert judge(POLICY, within, HEALTHY["blue"]).verdict == "breach"


@pytest.mark.parametrize("declared, error", [
    ({"steps": [10, 5, 100]}, "GATEWAY_MODELS model iris: rollout steps must increase strictly to 100, got [10, 5, 100]"),
    ({"steps": [10, 100], "pace": "fast"},
     "GATEWAY_MODELS model iris: not a rollout policy: Policy.__init__() got an unexpected keyword argument 'pace'"),
    ("fast", "GATEWAY_MODELS model iris: not a rollout policy: expected an object, got 'fast'"),
])
def test_the_gateway_refuses_a_policy_it_cannot_follow(declared, error):
    fields = {"bake_time_s": 1, "max_error_rate_increase": 0, "max_p99_latency_ratio": 1, "min_requests": 1,
              "check_interval_s": 1}
    with pytest.raises(PolicyError) as refused:
        Policy.from_fields({**fields, **declared} if isinstance(declared, dict) else declared, "GATEWAY_MODELS model iris")
    assert str(refused.value) == error


def rollout_env(folder) -> dict[str, str]:
    return {"PROMETHEUS_URL": "http://s-prometheus:9090/", "SCRAPE_INTERVAL_S": "15", "ROLLOUT_DIR": str(folder)}


ROLLOUTS = {"iris-classifier": (RolloutDeclaration(POLICY, "iris-classifier:2:"), 0),
            "diabetes": (RolloutDeclaration(POLICY, "diabetes:7:"), 20)}


def test_each_model_with_a_rollout_gets_its_own_controller_recording_in_its_own_folder(tmp_path):
    rollouts = controllers_from_env(rollout_env(tmp_path), ROLLOUTS)
    assert {model: (rollout.green_release, rollout.green_weight) for model, rollout in rollouts.items()} == {
        "iris-classifier": ("iris-classifier:2:", 10), "diabetes": ("diabetes:7:", 10)}
    for model in ROLLOUTS:
        assert [entry["event"] for entry in events(tmp_path / model)] == ["started", "step"]
        assert json.loads((tmp_path / model / "state.json").read_text())["green_release"] == ROLLOUTS[model][0].green_release
    assert controllers_from_env({}, {}) == {}, "no rollout, no controller and no Prometheus needed"


@pytest.mark.parametrize("change, error", [
    ({"SCRAPE_INTERVAL_S": ""}, "a rollout (iris-classifier, diabetes) needs SCRAPE_INTERVAL_S"),
    ({"SCRAPE_INTERVAL_S": "15s"}, "SCRAPE_INTERVAL_S must be a number of seconds, got '15s'"),
    ({"ROLLOUT_DIR": "/nonexistent/rollout"}, "ROLLOUT_DIR /nonexistent/rollout is not a writable folder: the rollout "
                                             "records every step there, so mount the stage's rollout volume on it"),
])
def test_an_incomplete_rollout_environment_is_refused_with_the_reason(tmp_path, change, error):
    with pytest.raises(PolicyError) as refused:
        controllers_from_env({**rollout_env(tmp_path), **change}, ROLLOUTS)
    assert str(refused.value) == error


def model_env(name: str, green_weight: int) -> dict:
    return {"name": name, "blue": [f"s-{name}-blue-0:8080"], "green": [f"s-{name}-green-0:8080"],
            "weights": {"blue": 100 - green_weight, "green": green_weight}}


CANARY_ENV = {"GATEWAY_MODELS": json.dumps([model_env("iris-classifier", 0), model_env("diabetes", 20)])}


def test_under_a_rollout_nginx_routes_that_model_by_whichever_of_its_route_files_exists(tmp_path):
    (tmp_path / "record").mkdir()
    rollout = controller(tmp_path / "record", Traffic(HEALTHY), Clock())
    running = Gateway(models_from_env(CANARY_ENV), runtime_dir=tmp_path / "nginx", rollouts={"iris-classifier": rollout})
    running.write_config()
    config = (tmp_path / "nginx" / "nginx.conf").read_text()
    for weight, shares in ((0, "        * blue;\n"), (10, "        90% blue;\n        * green;\n"),
                           (50, "        50% blue;\n        * green;\n"), (100, "        * green;\n")):
        assert f'split_clients "${{request_id}}" $slot_0_green_{weight} {{\n{shares}    }}' in config
        assert (f"if (-f {tmp_path}/nginx/route/iris-classifier/green-{weight}) {{ set $slot_0 $slot_0_green_{weight}; }}"
                in config)
    assert "set $slot_0 $slot_0_green_0;" in config, "until a route file exists, the declared weights"
    assert 'split_clients "${request_id}" $slot_1 {\n        80% blue;\n        * green;\n    }' in config, \
        "the model without a rollout keeps its declared split"
    assert "$slot_1_green_" not in config and "route/diabetes" not in config
    running.route_green("iris-classifier", rollout.green_weight)
    assert [path.name for path in (tmp_path / "nginx" / "route" / "iris-classifier").iterdir()] == ["green-10"]
    running.route_green("iris-classifier", 0)
    assert [path.name for path in (tmp_path / "nginx" / "route" / "iris-classifier").iterdir()] == ["green-0"]


def test_without_a_rollout_the_declared_split_is_all_there_is():
    config = render(models_from_env(CANARY_ENV), {})
    assert 'split_clients "${request_id}" $slot_0 {\n        * blue;\n    }' in config
    assert "_green_" not in config and "if (-f" not in config.split("location = /v2/health/ready")[0]
