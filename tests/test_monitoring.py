"""Monitoring: what the program declares for a stage with `monitoring:`, and on a real engine one stage
with Prometheus, blue and green, shared by every engine test here, including the retraining loop's data: the
stage samples every infer row (the model's `sampling: {fraction: 1.0}`), whose export is labelled, added as a dataset
and trained on.

The engine's stage is a private copy of dev (an `experiment:` block, free host ports) with one replica per slot,
scraped and evaluated every second, and a drift window small enough to fill in a few requests. Rows drawn
from the training data keep the drift scores low; the same rows with one feature shifted by three
standard deviations raise that feature's score above the stage's threshold and fire InputDrift.
"""
from __future__ import annotations

import csv
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_iris

from mlops import plan
from mlops.commands.train import training_image
from mlops.modelstore import BasicAuth, MlflowStore
from mlops_spec.contract import MLFLOW_PASSWORD, READER, derived_password, secret_variable
from mlops_spec.errors import SpecError
from mlops_spec.loading import load_stage, load_stages
from mlops_spec.project import ENVIRONMENTS_DIR, REPO_ROOT
from tests.conftest import fetch_build_inputs, free_port, private_copy_of_dev
from tests.engine import StageOnEngine
from tests.test_end_to_end import http_json, train

# The gateway image's modules, on its own path.
sys.path.insert(0, str(REPO_ROOT / "images" / "gateway"))
import metrics as gateway_metrics  # noqa: E402
from canary import sample_slots  # noqa: E402

WINDOW_ROWS = 400
THRESHOLD = 0.25
ROWS_PER_REQUEST = 50
SHIFTED_FEATURE = 2
PROMTOOL_TESTS = REPO_ROOT / "tests" / "promtool"
MODEL_NAME = "iris-classifier"
"""The model the monitored stage builds, trains and serves: models/iris-classifier."""
FEATURE_NAMES = tuple(load_iris().feature_names)
"""Its schema's features, which name the drift scores."""


@dataclass
class MonitoredStage:
    name: str
    engine: StageOnEngine
    gateway: str
    prometheus: str
    model: str
    environments: Path

    def mlops(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mlops", *args, "--environments", str(self.environments)],
                              capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)

    def query(self, promql: str) -> list[dict]:
        answer = http_json(f"{self.prometheus}/api/v1/query?{urllib.parse.urlencode({'query': promql})}")
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def value(self, promql: str) -> float | None:
        result = self.query(promql)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def infer(self, rows: np.ndarray, rows_per_request: int = ROWS_PER_REQUEST) -> None:
        for start in range(0, len(rows), rows_per_request):
            batch = rows[start:start + rows_per_request]
            http_json(f"{self.gateway}/v2/models/{self.model}/infer", {"inputs": [
                {"name": "input-0", "shape": list(batch.shape), "datatype": "FP64", "data": batch.ravel().tolist()}]})


def stage_file(name: str, ports: dict[str, int], release: dict | None) -> dict:
    spec = private_copy_of_dev(name, ports) | {
        "monitoring": {"port": {"host_port": ports["prometheus"]}, "scrape_interval_s": 1,
                       "evaluation_interval_s": 1, "drift_threshold": THRESHOLD, "drift_window_rows": WINDOW_ROWS},
    }
    spec["serving"]["replicas"] = 1
    spec["models"] = {MODEL_NAME: {"sampling": {"fraction": 1.0}}}
    if release is not None:
        spec["models"][MODEL_NAME] |= {"release": release, "green": release}
    return spec


def declared_prometheus(spec) -> dict:
    [container] = [resource.inputs for resource in plan.render(spec.stage, spec)
                   if resource.type == "docker:index/container:Container" and resource.name.endswith("-prometheus")]
    return container


def test_scrape_targets_follow_the_declared_replicas_of_both_slots():
    spec = load_stage("dev", overrides={"serving": {"replicas": 2},
                                        "models": {"iris-classifier": {"green": {"version": 2}}},
                                        "monitoring": {"port": {"host_port": 9390}, "drift_threshold": 0.3}})
    container = declared_prometheus(spec)
    env = dict(entry.split("=", 1) for entry in container["envs"])
    config = json.loads(env["PROMETHEUS_CONFIG"])
    targets = {job["job_name"]: {target: config_entry["labels"] for config_entry in job["static_configs"]
                                 for target in config_entry["targets"]} for job in config["scrape_configs"]}
    assert targets == {
        "serving": {f"dev-{model}-{slot}-{index}:8082": {"slot": slot, "model": model, "model_version": version}
                    for model, slot, version in (("diabetes-regressor", "blue", "latest"),
                                                 ("iris-classifier", "blue", "latest"),
                                                 ("iris-classifier", "green", "2")) for index in (0, 1)},
        "gateway": {"dev-gateway:9102": {}},
    }
    assert env["DRIFT_THRESHOLD"] == "0.3"
    assert container["ports"] == [{"internal": 9090, "external": 9390, "ip": "127.0.0.1"}]
    assert container["volumes"] == [{"volumeName": "dev-metrics", "containerPath": "/prometheus"}]
    assert (container["readOnly"], container["user"], container["capabilities"]) == (True, "10001:10001",
                                                                                    {"drops": ["ALL"]})


def test_without_monitoring_nothing_is_scraped_and_replicas_score_no_drift():
    spec = load_stage("dev")
    resources = plan.render("dev", spec)
    assert not [resource for resource in resources if "prometheus" in resource.name or "metrics" in resource.name]
    replica_env = [resource.inputs["envs"] for resource in resources if resource.name.endswith("-blue-0")]
    assert replica_env and not any("DRIFT_WINDOW_ROWS" in str(entry) for entry in replica_env[0])


def test_a_bad_monitoring_value_is_one_line_naming_file_line_and_field(environments):
    (environments / "dev.yaml").write_text((environments / "dev.yaml").read_text()
                                           + "monitoring:\n  port: {host_port: 9390}\n  drift_threshold: high\n")
    with pytest.raises(SpecError) as raised:
        load_stage("dev", environments)
    assert str(raised.value).endswith("dev.yaml:19: monitoring.drift_threshold: Input should be a valid number, "
                                      "unable to parse string as a number (got 'high')")


def test_the_gateway_counts_its_access_log_by_model_slot_and_status_into_histograms():
    metrics = gateway_metrics.GatewayMetrics()
    for model, slot, status, seconds in (("iris", "blue", 200, 0.003), ("iris", "blue", 200, 0.2),
                                         ("iris", "green", 502, 0.0004), ("diabetes", "blue", 200, 0.02)):
        metrics.record(f'<190>Nov 27 20:00:00 gateway: {{"model":"{model}","slot":"{slot}","status":"{status}",'
                       f'"seconds":"{seconds}"}}')
    metrics.record("<190>Nov 27 20:00:00 gateway: not json")
    metrics.record('<190>Nov 27 20:00:00 gateway: {"slot":"blue","status":"200","seconds":"0.1"}')
    samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in text_string_to_metric_families(metrics.exposition()) for sample in family.samples}
    iris_blue, iris_green = (("model", "iris"), ("slot", "blue")), (("model", "iris"), ("slot", "green"))
    assert samples[("mlops_gateway_requests_total", (("code", "200"), *iris_blue))] == 2
    assert samples[("mlops_gateway_requests_total", (("code", "502"), *iris_green))] == 1
    assert samples[("mlops_gateway_requests_total", (("code", "200"), ("model", "diabetes"), ("slot", "blue")))] == 1
    bucket = "mlops_gateway_request_duration_seconds_bucket"
    assert samples[(bucket, (("le", "0.0025"), *iris_blue))] == 0
    assert samples[(bucket, (("le", "0.005"), *iris_blue))] == 1
    assert samples[(bucket, (("le", "+Inf"), *iris_blue))] == 2
    assert samples[(bucket, (("le", "0.0005"), *iris_green))] == 1
    assert samples[(bucket, (("le", "0.025"), ("model", "diabetes"), ("slot", "blue")))] == 1
    assert samples[("mlops_gateway_request_duration_seconds_count", iris_blue)] == 2
    assert samples[("mlops_gateway_request_duration_seconds_sum", iris_blue)] == pytest.approx(0.203)
    assert sum(value for (name, _), value in samples.items() if name == "mlops_gateway_requests_total") == 4, \
        "a line without its model is not counted"


def test_the_gateway_exporter_counts_every_datagram_its_thread_receives_while_it_is_scraped():
    """nginx's lines arrive as UDP datagrams on one thread while scrapes are answered on another: every line sent
    is counted once, and a scrape taken meanwhile reads a consistent histogram (its count equals its +Inf bucket)."""
    scrape_port, syslog_port = free_port(), free_port()
    exporter = gateway_metrics.GatewayMetrics()
    gateway_metrics.serve(exporter, port=scrape_port, syslog=("127.0.0.1", syslog_port))
    sent = 3000
    line = b'<190>Dec  6 10:00:00 gateway: {"model":"iris","slot":"blue","status":"200","seconds":"0.002"}'

    def scrape() -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{scrape_port}/metrics", timeout=5) as answer:
            return {sample.name + sample.labels.get("le", ""): sample.value
                    for family in text_string_to_metric_families(answer.read().decode())
                    for sample in family.samples}

    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for number in range(sent):
        sender.sendto(line, ("127.0.0.1", syslog_port))
        if number % 100 == 0:
            # Within what a gulp holds on a host with the default receive buffer cap (metrics.GATHER_S).
            midway = scrape()
            assert midway.get("mlops_gateway_request_duration_seconds_count", 0) == \
                midway.get("mlops_gateway_request_duration_seconds_bucket+Inf", 0)
            time.sleep(gateway_metrics.GATHER_S)
    deadline = time.monotonic() + 10
    while scrape().get("mlops_gateway_requests_total") != sent and time.monotonic() < deadline:
        time.sleep(0.05)
    final = scrape()
    assert final["mlops_gateway_requests_total"] == sent
    assert final["mlops_gateway_request_duration_seconds_bucket0.0025"] == sent


def test_the_gateway_exporter_is_woken_once_for_the_lines_that_gathered_and_takes_them_all():
    """A thread woken per line cost the CPU the gateway shares with a replica two context switches per request:
    the reader blocks for the first line only, and takes the ones that gathered behind it without blocking."""
    class AllRead(Exception):
        """Where the reading thread would block until the next gulp's first line."""

    class GatheredLines:
        def __init__(self, lines: list[bytes]) -> None:
            self.waiting, self.blocking_receives = lines, 0

        def recv(self, size: int, flags: int = 0) -> bytes:
            if not self.waiting:
                raise BlockingIOError if flags & socket.MSG_DONTWAIT else AllRead
            self.blocking_receives += not flags & socket.MSG_DONTWAIT
            return self.waiting.pop(0)

    statuses = ["200"] * 299 + ["502"]
    gathered = GatheredLines([f'<190>Dec  7 23:00:00 gateway: {{"model":"iris","slot":"blue","status":"{status}",'
                              f'"seconds":"0.002"}}'.encode() for status in statuses])
    exporter = gateway_metrics.GatewayMetrics()
    with pytest.raises(AllRead):
        gateway_metrics.read_access_log(exporter, gathered)
    assert exporter.requests == {("iris", "blue", "200"): 299, ("iris", "blue", "502"): 1}
    assert gathered.blocking_receives == 1


@pytest.fixture(scope="module")
def stage(docker_engine, tmp_path_factory):
    fetch_build_inputs()
    environments = tmp_path_factory.mktemp("monitoring") / "environments"
    environments.mkdir()
    for file in ENVIRONMENTS_DIR.glob("*.yaml"):
        (environments / file.name).write_text(file.read_text())
    name = f"t-mon-{uuid.uuid4().hex[:6]}"
    ports = {role: free_port() for role in ("mlflow", "gateway", "prometheus")}

    def declare(release: dict | None) -> None:
        (environments / f"{name}.yaml").write_text(yaml.safe_dump(stage_file(name, ports, release), sort_keys=False))
        engine.spec = load_stages([name], environments)[0]

    # First the model it builds images from, following its newest version (none yet): the training run needs
    # the model's training image. Without Prometheus yet: the redeploy below replaces these replicas and the
    # Prometheus container (its configuration lists their labels), and a restarted Prometheus writes no staleness
    # markers, so the first replicas' series would stay in every query for its 5-minute lookback.
    first = stage_file(name, ports, {"version": "latest"})
    del first["models"][MODEL_NAME]["green"], first["monitoring"]
    (environments / f"{name}.yaml").write_text(yaml.safe_dump(first, sort_keys=False))
    engine = StageOnEngine(stack=name, spec=load_stages([name], environments)[0], registry_password=uuid.uuid4().hex)
    variable = secret_variable(MLFLOW_PASSWORD, name)
    os.environ[variable] = engine.mlflow_password
    try:
        engine.deploy()
        registered = train(name, environments)
        pin = {"version": int(registered["version"]), "sha256": registered["sha256"]}
        declare(pin)
        engine.deploy()
        yield MonitoredStage(name=name, engine=engine, gateway=f"http://127.0.0.1:{ports['gateway']}",
                             prometheus=f"http://127.0.0.1:{ports['prometheus']}", model=registered["name"],
                             environments=environments)
    finally:
        os.environ.pop(variable, None)
        engine.teardown()


def eventually(check: Callable[[], object], timeout_s: float = 60, what: str = "") -> object:
    """The first truthy answer of `check`, polled every half second; fails with the last answer."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = check()
        if answer:
            return answer
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout_s:.0f}s: {what} (last: {answer!r})")
        time.sleep(0.5)


def promtool(stage: MonitoredStage, *args: str, tests: Path = PROMTOOL_TESTS) -> subprocess.CompletedProcess:
    """promtool of the stage's own Prometheus image, with the folder `tests` (the repo's rule tests) at /tests."""
    image = stage.engine.client.containers.get(f"{stage.name}-prometheus").image.id
    return subprocess.run(["docker", "run", "--rm", "--network", "none", "--read-only", "--tmpfs", "/tmp",
                           "--user", "10001:10001", "-v", f"{tests}:/tests:ro", image, "promtool", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.docker
def test_promtool_accepts_the_rules_and_their_unit_tests_pass(stage):
    checked = promtool(stage, "check", "rules", "/etc/prometheus/rules/mlops.yml")
    assert checked.returncode == 0 and "SUCCESS" in checked.stdout, checked.stdout + checked.stderr
    tested = promtool(stage, "test", "rules", *(f"/tests/{file.name}" for file in sorted(PROMTOOL_TESTS.glob("*.yml"))))
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


@pytest.mark.docker
def test_the_canary_counts_only_the_gateways_series_of_its_model_whatever_else_exports_their_names(stage, tmp_path):
    """A replica's metrics port serves what its code registers: series named like the gateway's, with many
    successes and failures of green, must not move the rollout's judgement of green. The canary's own queries,
    evaluated by the stage's Prometheus (promtool) over such series."""
    queries: list[str] = []
    sample_slots(lambda promql: queries.append(promql) or {}, "iris", window_s=60, scrape_interval_s=15)
    requests, failed, _p99 = queries
    gateway = 'mlops_gateway_requests_total{job="gateway", instance="s-gateway:9102", model="%s", slot="green", code="%s"}'
    foreign = 'mlops_gateway_requests_total{job="serving", instance="s-serving-green-0:8082", model="iris", slot="green", code="%s"}'
    # Counters rising linearly, so increase() over the canary's 60 s window is exact: 4/s and 1/s from the gateway
    # for iris; another model's green fails all it answers and must not count against iris's.
    series = {gateway % ("iris", 200): "0+60x40", gateway % ("iris", 500): "0+15x40", gateway % ("diabetes", 500): "0+600x40",
              foreign % 200: "0+6000x40", foreign % 500: "0+600x40"}
    tmp_path.chmod(0o755)  # promtool runs as uid 10001
    (tmp_path / "canary_test.yml").write_text(yaml.safe_dump({"rule_files": [], "evaluation_interval": "15s", "tests": [{
        "interval": "15s",
        "input_series": [{"series": name, "values": values} for name, values in series.items()],
        "promql_expr_test": [
            {"expr": requests, "eval_time": "5m", "exp_samples": [{"labels": '{slot="green"}', "value": 300}]},
            {"expr": failed, "eval_time": "5m", "exp_samples": [{"labels": '{slot="green"}', "value": 60}]},
        ]}]}))
    tested = promtool(stage, "test", "rules", "/tests/canary_test.yml", tests=tmp_path)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


@pytest.mark.docker
def test_every_replica_and_the_gateway_are_scraped_and_up(stage):
    def targets() -> dict[tuple[str, str], str]:
        active = http_json(f"{stage.prometheus}/api/v1/targets")["data"]["activeTargets"]
        return {(target["labels"]["job"], target["labels"].get("slot", "")): target["health"] for target in active}

    expected = dict.fromkeys([("serving", "blue"), ("serving", "green"), ("gateway", "")], "up")
    eventually(lambda: targets() == expected, what=f"targets {expected}")
    info = stage.query('oip_model_info{job="serving"}')
    assert {result["metric"]["slot"] for result in info} == {"blue", "green"}
    assert all(result["metric"]["model_version"] == result["metric"]["version"] for result in info)
    assert stage.value("mlops:drift_threshold") == THRESHOLD


@pytest.mark.docker
def test_the_recorded_request_counts_match_the_requests_sent(stage):
    gateway_ok = 'sum(mlops_gateway_requests_total{slot="blue", code="200"}) or vector(0)'
    replica_ok = 'sum(oip_infer_requests_total{slot="blue", status="200"}) or vector(0)'
    # Two scrapes after anything sent before, so the baseline is current.
    time.sleep(2.5)
    before = (stage.value(gateway_ok), stage.value(replica_ok))
    sent = 17
    stage.infer(load_iris().data[:sent], rows_per_request=1)
    eventually(lambda: (stage.value(gateway_ok), stage.value(replica_ok)) == (before[0] + sent, before[1] + sent),
               what=f"{sent} more requests at the gateway and the blue replica than {before}")
    assert stage.value('sum(mlops_gateway_requests_total{slot="green"}) or vector(0)') == 0


@pytest.mark.docker
def test_the_web_ui_serves_the_graph_and_every_asset_it_links_offline(stage):
    with urllib.request.urlopen(f"{stage.prometheus}/classic/graph?g0.expr=mlops%3Adrift_psi%3Amax", timeout=10) as page:
        assets = set(re.findall(r'(?:src|href)="(/classic/static/[^"]+)"', page.read().decode()))
    assert len(assets) > 10
    for asset in sorted(assets):
        with urllib.request.urlopen(f"{stage.prometheus}{asset}", timeout=10) as served:
            assert served.status == 200 and served.read(), asset
    for page_path in ("/classic/alerts", "/classic/targets"):
        with urllib.request.urlopen(f"{stage.prometheus}{page_path}", timeout=10) as served:
            assert served.status == 200


def drift_scores(stage: MonitoredStage, rows_sent: int) -> dict[str, float]:
    """Blue's PSI by feature, once Prometheus has scraped the replica after all `rows_sent` predictions."""
    eventually(lambda: stage.value('sum(mlops_predictions_total{slot="blue"})') == rows_sent,
               what=f"{rows_sent} predictions scraped")
    time.sleep(1.5)  # one evaluation of the recording rules after that scrape
    return {result["metric"]["feature"]: float(result["value"][1])
            for result in stage.query('mlops:drift_psi:max{slot="blue"}')}


def firing_drift_alerts(stage: MonitoredStage) -> list[dict]:
    alerts = http_json(f"{stage.prometheus}/api/v1/alerts")["data"]["alerts"]
    return [alert for alert in alerts if alert["labels"]["alertname"] == "InputDrift" and alert["state"] == "firing"]


@pytest.mark.docker
def test_training_like_inputs_keep_drift_low_and_a_shifted_feature_fires_the_alert(stage):
    iris = load_iris().data
    rng = np.random.default_rng(0)
    already = stage.value('sum(mlops_predictions_total{slot="blue"}) or vector(0)')
    like_training = iris[rng.integers(0, len(iris), 2 * WINDOW_ROWS)]
    stage.infer(like_training)
    scores = drift_scores(stage, already + len(like_training))
    # Named by the model's schema (models/iris-classifier/mlops-model.yaml), which its manifest carries.
    assert sorted(scores) == sorted(FEATURE_NAMES)
    assert max(scores.values()) < THRESHOLD, scores
    assert firing_drift_alerts(stage) == []
    quiet = stage.mlops("drift", "--stage", stage.name)
    assert quiet.returncode == 0 and "drifted" not in quiet.stdout, quiet.stdout + quiet.stderr

    shifted = iris[rng.integers(0, len(iris), 2 * WINDOW_ROWS)].copy()
    shifted[:, SHIFTED_FEATURE] += 3 * iris[:, SHIFTED_FEATURE].std()
    stage.infer(shifted)
    scores = drift_scores(stage, already + len(like_training) + len(shifted))
    shifted_name = FEATURE_NAMES[SHIFTED_FEATURE]
    assert scores[shifted_name] > THRESHOLD, scores
    assert max(score for feature, score in scores.items() if feature != shifted_name) < THRESHOLD, scores
    alerts = eventually(lambda: firing_drift_alerts(stage), timeout_s=30, what="InputDrift firing")
    assert [(alert["labels"]["feature"], alert["labels"]["slot"]) for alert in alerts] == [(shifted_name, "blue")]
    drifted = stage.mlops("drift", "--stage", stage.name)
    assert drifted.returncode == 1, drifted.stdout + drifted.stderr
    assert f"drifted above {THRESHOLD}: {shifted_name}" in drifted.stdout

    status = stage.mlops("status", stage.name, "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    reported = json.loads(status.stdout)
    assert {row["service"]: row["ok"] for row in reported["rows"]}["Prometheus"] is True
    slots = {slot["slot"]: slot for slot in reported["slots"]}
    assert (slots["blue"]["weight"], slots["green"]["weight"]) == (100, 0)
    assert slots["blue"]["version"] == slots["green"]["version"]
    assert slots["blue"]["max_drift"] == pytest.approx(scores[shifted_name], rel=0.05)
    assert reported["slots_problem"] is None


def predict(stage: MonitoredStage, rows: np.ndarray, rows_per_request: int) -> list[int]:
    """The gateway's predictions for `rows`, sent in requests of `rows_per_request`."""
    predictions: list[int] = []
    for start in range(0, len(rows), rows_per_request):
        batch = rows[start:start + rows_per_request]
        answer = http_json(f"{stage.gateway}/v2/models/{stage.model}/infer", {"inputs": [
            {"name": "input-0", "shape": list(batch.shape), "datatype": "FP64", "data": batch.ravel().tolist()}]})
        predictions += answer["outputs"][0]["data"]
    return predictions


def exported_samples(stage: MonitoredStage, out: Path) -> list[list[str]]:
    exported = stage.mlops("data", "samples", "--stage", stage.name, "--out", str(out))
    assert exported.returncode == 0, exported.stdout + exported.stderr
    header, *rows = list(csv.reader(out.read_text().splitlines()))
    assert header[-2:] == ["prediction", "label"] and len(header) == 6
    return rows


def datasets_on_the_volume(stage: MonitoredStage) -> list[str]:
    """Every file on the stage's datasets volume (each model's folder), temporary ones included, as the training
    image sees it."""
    every_file = ("import json, os; print(json.dumps(sorted(os.path.relpath(os.path.join(folder, name), "
                  "'/data/datasets') for folder, _, names in os.walk('/data/datasets') for name in names)))")
    listed = subprocess.run(["docker", "run", "--rm", "--network", "none", "--user", "10001:10001", "--entrypoint",
                             "python3", "--volume", f"{stage.name}-datasets:/data/datasets:ro",
                             training_image(stage.engine.spec, MODEL_NAME, stage.environments), "-c", every_file],
                            capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)


@pytest.mark.docker
def test_every_infer_row_is_sampled_with_its_prediction_and_exported_for_labelling(stage, tmp_path):
    before = exported_samples(stage, tmp_path / "before.csv")
    rows = load_iris().data[3::11]  # 14 rows, in requests of 1, 5 and 8 rows
    predictions = predict(stage, rows[:1], 1) + predict(stage, rows[1:6], 5) + predict(stage, rows[6:], 8)
    new = exported_samples(stage, tmp_path / "after.csv")[len(before):]
    assert len(new) == len(rows) == 14
    assert [[float(value) for value in row[:4]] for row in new] == rows.tolist()
    assert [int(row[4]) for row in new] == predictions
    assert all(row[5] == "" for row in new), "the label is left to fill in"
    blue = f"{stage.name}-{MODEL_NAME}-blue-0"
    assert stage.value(f'mlops_samples_written_rows_total{{instance="{blue}:8082"}}') is not None
    assert stage.value('sum(mlops_samples_dropped_rows_total) or vector(0)') == 0


@pytest.mark.docker
def test_labelled_samples_become_a_dataset_that_a_training_run_names_and_profiles(stage, tmp_path):
    rows = load_iris().data
    predict(stage, rows, 50)
    exported = tmp_path / "samples.csv"
    exported_samples(stage, exported)
    header, *samples = list(csv.reader(exported.read_text().splitlines()))
    labelled = tmp_path / "labelled.csv"
    with labelled.open("w", newline="") as out:  # labelled with the predictions, as a spreadsheet saves it
        csv.writer(out, lineterminator="\n").writerows([header, *([*row[:5], row[4]] for row in samples)])
    added = stage.mlops("data", "add", "--stage", stage.name, str(labelled))
    assert added.returncode == 0, added.stdout + added.stderr
    name = re.search(r"(?:ADDED|EXISTS) name=([0-9a-f]{64}\.csv) rows=(\d+)", added.stdout)
    assert name is not None and int(name[2]) == len(samples), added.stdout
    listed = json.loads(stage.mlops("data", "list", "--stage", stage.name, "--json").stdout)
    assert listed[-1]["name"] == name[1] and listed[-1]["rows"] == len(samples)

    registered = train(stage.name, stage.environments, "--data", "latest")
    mlflow = f"http://127.0.0.1:{stage.engine.host_port(f'{stage.name}-model-registry', 5000)}"
    reader = BasicAuth(READER, derived_password(stage.engine.mlflow_password, READER))
    manifest = json.loads(MlflowStore(mlflow, reader).fetch(registered["name"], int(registered["version"]))
                          .files["manifest.json"])
    inputs = manifest["inputs"]
    assert (inputs["dataset"], inputs["dataset_sha256"]) == (name[1], name[1][:-4])
    assert inputs["rows"] == len(samples)
    # The reference profile is the dataset's: computed here from the same file as the run's.
    sys.path.insert(0, str(REPO_ROOT / "images" / "training"))
    from mlops_training import datasets  # noqa: PLC0415 - the training image's package, on its own path
    from mlops_training.project import load_project  # noqa: PLC0415
    from mlops_training.runner import TrainingRequest  # noqa: PLC0415
    from mlops_training.runner import train as train_in_process

    iris = load_project(REPO_ROOT / "models" / "iris-classifier")
    local = tmp_path / "datasets"
    datasets.model_folder(iris, local).mkdir(parents=True)
    assert datasets.add(labelled.read_bytes(), datasets.RowRules.of(iris), datasets.model_folder(iris, local))[0] == name[1]
    expected = train_in_process(iris, TrainingRequest(dataset="latest"), tmp_path / "local-run", local).manifest
    assert manifest["reference_profile"] == expected["reference_profile"]
    assert manifest["reference_profile"]["rows"] == inputs["rows"]


@pytest.mark.docker
@pytest.mark.parametrize(("content", "problem"), [
    ("sepal length (cm),sepal width (cm),petal length (cm),petal width (cm),prediction,label\n"
     "5.1,3.5,1.4,0.2,0,0\n6.7,3.0,5.2,2.3,2,\n",
     "row 2 (line 3) has no label; label every row (or delete it) first"),
    ("sepal length (cm),sepal width (cm),petal length (cm),petal width (cm),label\n5.1,3.5,1.4,0.2,9\n",
     "row 1 (line 2): label '9' is not a known class (0, 1, 2)"),
    ("petal,label\n1,0\n", "the header must be iris-classifier's features then its label, sepal length (cm),sepal "
                             "width (cm),petal length (cm),petal width (cm),label (a 'prediction' column is allowed "
                             "and dropped); got petal,label"),
], ids=["unlabelled row", "unknown class", "header"])
def test_a_bad_dataset_is_one_line_exit_2_and_nothing_on_the_volume(stage, tmp_path, content, problem):
    before = datasets_on_the_volume(stage)
    bad = tmp_path / "bad.csv"
    bad.write_text(content)
    added = stage.mlops("data", "add", "--stage", stage.name, str(bad))
    assert (added.returncode, added.stdout, added.stderr) == (2, "", f"error: {bad}: {problem}\n")
    assert datasets_on_the_volume(stage) == before
