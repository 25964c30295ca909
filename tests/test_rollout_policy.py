"""The rollout policy of a model's green slot: a good one validates; each bad value is one line naming file, line and field."""
from __future__ import annotations

import pytest

from mlops_spec.loading import load_stage
from tests.test_spec_errors import run_cli

GOOD_POLICY = """\
    green:
      version: 2
      rollout:
        steps: [10, 50, 100]
        bake_time_s: 60
        max_error_rate_increase: 0.01
        max_p99_latency_ratio: 1.5
        min_requests: 50
"""
IRIS = "  iris-classifier:\n    release: {version: latest}\n"


def with_policy(environments, policy: str = GOOD_POLICY) -> None:
    """dev.yaml with iris-classifier's green under `policy`, and monitored."""
    dev = environments / "dev.yaml"
    content = dev.read_text()
    assert IRIS in content
    dev.write_text(content.replace(IRIS, IRIS + policy) + "monitoring:\n  port: {host_port: 9190}\n")


def test_a_good_policy_validates_with_its_defaults(environments):
    with_policy(environments)
    rollout = load_stage("dev", environments).models["iris-classifier"].green.rollout
    assert (rollout.steps, rollout.bake_time_s, rollout.min_requests, rollout.check_interval_s) == ([10, 50, 100], 60, 50, 5)
    assert (rollout.max_error_rate_increase, rollout.max_p99_latency_ratio) == (0.01, 1.5)


# dev.yaml lines: 13 green, 15 rollout, 16 steps, 17 bake_time_s, 18 max_error_rate_increase, 19 max_p99_latency_ratio,
# 20 min_requests.
BAD_POLICIES = {
    "weight above 100": ("[10, 50, 100]", "[10, 150, 100]",
                         "dev.yaml:18: models.iris-classifier.green.rollout.steps.1: Input should be less than or equal to 100 (got 150)"),
    "weight below 1": ("[10, 50, 100]", "[0, 50, 100]",
                       "dev.yaml:18: models.iris-classifier.green.rollout.steps.0: Input should be greater than or equal to 1 (got 0)"),
    "steps not increasing": ("[10, 50, 100]", "[10, 50, 40, 100]",
                             "dev.yaml:18: models.iris-classifier.green.rollout.steps: steps must be strictly increasing, got 40 after 50"),
    "a step repeated": ("[10, 50, 100]", "[10, 10, 100]",
                        "dev.yaml:18: models.iris-classifier.green.rollout.steps: steps must be strictly increasing, got 10 after 10"),
    "not ending at 100": ("[10, 50, 100]", "[10, 50]",
                          "dev.yaml:18: models.iris-classifier.green.rollout.steps: the last step must be 100 (all traffic to green), got 50"),
    "no steps": ("[10, 50, 100]", "[]",
                 "dev.yaml:18: models.iris-classifier.green.rollout.steps: List should have at least 1 item after validation, not 0"),
    "a step as text": ("[10, 50, 100]", "[10, '50', 100]",
                       "dev.yaml:18: models.iris-classifier.green.rollout.steps.1: Input should be a valid integer (got '50')"),
    "threshold as text": ("max_p99_latency_ratio: 1.5", "max_p99_latency_ratio: '1.5'",
                          "dev.yaml:21: models.iris-classifier.green.rollout.max_p99_latency_ratio: Input should be a valid number "
                          "(got '1.5')"),
    "threshold as a boolean": ("max_error_rate_increase: 0.01", "max_error_rate_increase: true",
                               "dev.yaml:20: models.iris-classifier.green.rollout.max_error_rate_increase: Input should be a valid "
                               "number (got True)"),
    "error rate above 1": ("max_error_rate_increase: 0.01", "max_error_rate_increase: 5",
                           "dev.yaml:20: models.iris-classifier.green.rollout.max_error_rate_increase: Input should be less than or "
                           "equal to 1 (got 5)"),
    "latency ratio below 1": ("max_p99_latency_ratio: 1.5", "max_p99_latency_ratio: 0.5",
                              "dev.yaml:21: models.iris-classifier.green.rollout.max_p99_latency_ratio: Input should be greater than "
                              "or equal to 1 (got 0.5)"),
    "bake time as a float": ("bake_time_s: 60", "bake_time_s: 60.5",
                             "dev.yaml:19: models.iris-classifier.green.rollout.bake_time_s: Input should be a valid integer (got 60.5)"),
    "unknown key": ("min_requests: 50", "min_request: 50",
                    "dev.yaml:22: models.iris-classifier.green.rollout.min_request: unknown key 'min_request'; allowed here: bake_time_s, "
                    "check_interval_s, max_error_rate_increase, max_p99_latency_ratio, min_requests, steps"),
}


@pytest.mark.parametrize("case", sorted(BAD_POLICIES))
def test_each_bad_policy_value_is_one_line_with_file_and_line(case, environments, monkeypatch, capsys):
    old, new, expected = BAD_POLICIES[case]
    assert old in GOOD_POLICY
    with_policy(environments, GOOD_POLICY.replace(old, new))
    code, out, err = run_cli(monkeypatch, capsys, "validate", "dev", "--environments", str(environments))
    assert (code, out) == (2, "")
    assert err == f"error: {environments}/{expected}\n"


def test_a_rollout_needs_the_stage_monitored(environments, monkeypatch, capsys):
    with_policy(environments)
    dev = environments / "dev.yaml"
    dev.write_text(dev.read_text().replace("monitoring:\n  port: {host_port: 9190}\n", ""))
    code, _, err = run_cli(monkeypatch, capsys, "validate", "dev", "--environments", str(environments))
    assert code == 2
    assert err == (f"error: {environments}/dev.yaml:17: models.iris-classifier.green.rollout: a rollout is judged from the stage's "
                   "Prometheus: declare 'monitoring' too\n")


def test_a_step_lasts_at_least_four_scrapes(environments, monkeypatch, capsys):
    with_policy(environments, GOOD_POLICY.replace("bake_time_s: 60", "bake_time_s: 59"))
    code, _, err = run_cli(monkeypatch, capsys, "validate", "dev", "--environments", str(environments))
    assert code == 2
    assert err == (f"error: {environments}/dev.yaml:19: models.iris-classifier.green.rollout.bake_time_s: 59 s is shorter than 4 "
                   "scrapes of monitoring.scrape_interval_s (15 s), the least a step is judged over\n")


def test_the_first_step_must_be_above_the_declared_green_weight(environments, monkeypatch, capsys):
    with_policy(environments, GOOD_POLICY + "    traffic: {blue: 80, green: 20}\n")
    code, _, err = run_cli(monkeypatch, capsys, "validate", "dev", "--environments", str(environments))
    assert code == 2
    assert err == (f"error: {environments}/dev.yaml:18: models.iris-classifier.green.rollout.steps: the first step (10) must be above "
                   "the declared models.iris-classifier.traffic.green (20), where the rollout starts\n")


def test_each_models_policy_is_its_own(environments, monkeypatch, capsys):
    """A good policy on one model and a bad one on another: the error names the other model's field and line."""
    with_policy(environments)
    dev = environments / "dev.yaml"
    regressor = "  diabetes-regressor:\n    release: {version: latest}\n"
    content = dev.read_text()
    assert regressor in content
    dev.write_text(content.replace(regressor, regressor + GOOD_POLICY.replace("[10, 50, 100]", "[10, 50]")))
    code, _, err = run_cli(monkeypatch, capsys, "validate", "dev", "--environments", str(environments))
    line = next(number for number, text in enumerate(dev.read_text().splitlines(), start=1) if text == "        steps: [10, 50]")
    assert code == 2
    assert err == (f"error: {environments}/dev.yaml:{line}: models.diabetes-regressor.green.rollout.steps: the last step "
                   "must be 100 (all traffic to green), got 50\n")
