"""`mlops drift --stage STAGE` against a stand-in for the stage's Prometheus query API: exit 0 at or below the
declared threshold, 1 above it, 2 (one line) on bad input or no answer."""
from __future__ import annotations

import json
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from mlops_spec.project import REPO_ROOT
from tests.conftest import free_port
from tests.test_spec_errors import run_cli

SELECTOR = re.compile(r'mlops:drift_psi:max(\{model="(?P<model>[a-z0-9-]+)"\})?')


class FakePrometheus(ThreadingHTTPServer):
    """Answers instant queries of the recording rule `mlops:drift_psi:max`, with or without a model selector, with
    the `series` it selects, and records them."""

    def __init__(self) -> None:
        self.series: list[tuple[dict[str, str], str]] = []
        self.queries: list[str] = []
        super().__init__(("127.0.0.1", 0), self.Handler)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server hook
            prometheus = self.server
            assert isinstance(prometheus, FakePrometheus)
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query).get("query", [""])[0]
            prometheus.queries.append(query)
            body: dict[str, object]
            selected = SELECTOR.fullmatch(query)
            if url.path != "/api/v1/query" or selected is None:
                body = {"status": "error", "errorType": "bad_data", "error": f"unexpected {url.path} {query}"}
            else:
                body = {"status": "success", "data": {"resultType": "vector", "result": [
                    {"metric": labels, "value": [1764274000.0, value]} for labels, value in prometheus.series
                    if selected["model"] in (None, labels["model"])]}}
            answer = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *_args) -> None:
            pass


@pytest.fixture
def prometheus():
    server = FakePrometheus()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def monitored(environments, port: int, threshold: float = 0.2) -> None:
    dev = environments / "dev.yaml"
    dev.write_text(dev.read_text() + f"monitoring:\n  port: {{host_port: {port}}}\n  drift_threshold: {threshold}\n")


def score(feature: str, psi: str, slot: str = "blue", model: str = "iris-classifier") -> tuple[dict[str, str], str]:
    return {"slot": slot, "model": model, "model_version": "3", "feature": feature}, psi


def table_rows(out: str) -> list[list[str]]:
    """The cells of each score row of the printed table."""
    return [[cell.strip() for cell in line.strip().strip("│").split("│")]
            for line in out.splitlines() if "│" in line and ("iris-classifier" in line or "diabetes-regressor" in line)]


def test_scores_at_or_below_the_threshold_exit_0_and_are_listed(environments, prometheus, monkeypatch, capsys):
    monitored(environments, prometheus.server_port)
    prometheus.series = [score("petal_length", "0.2"), score("sepal_width", "0.031"), score("petal_width", "NaN")]
    code, out, err = run_cli(monkeypatch, capsys, "drift", "--stage", "dev", "--environments", str(environments))
    assert (code, err) == (0, "")
    assert prometheus.queries == ["mlops:drift_psi:max"]
    assert table_rows(out) == [["iris-classifier", "blue", "3", "petal_length", "0.200"],
                               ["iris-classifier", "blue", "3", "sepal_width", "0.031"]]
    assert "threshold 0.2" in out and "drifted" not in out


def test_a_feature_above_the_threshold_exits_1_and_is_named(environments, prometheus, monkeypatch, capsys):
    monitored(environments, prometheus.server_port, threshold=0.25)
    prometheus.series = [score("sepal_width", "0.02"), score("petal_length", "1.84", slot="green"),
                         score("petal_length", "0.3")]
    code, out, err = run_cli(monkeypatch, capsys, "drift", "--stage", "dev", "--environments", str(environments))
    assert (code, err) == (1, "")
    assert out.splitlines()[-1] == "drifted above 0.25: petal_length of iris-classifier"
    assert [row[1] + " " + row[4] for row in table_rows(out)] == ["green 1.840", "blue 0.300", "blue 0.020"]


DRIFTED_IRIS = [score("petal_length", "1.84"), score("bmi", "0.05", model="diabetes-regressor"),
                score("age", "0.3", slot="green", model="diabetes-regressor")]


def test_every_served_models_drift_is_checked_and_named(environments, prometheus, monkeypatch, capsys):
    monitored(environments, prometheus.server_port, threshold=0.25)
    prometheus.series = DRIFTED_IRIS
    code, out, err = run_cli(monkeypatch, capsys, "drift", "--stage", "dev", "--environments", str(environments))
    assert (code, err) == (1, "")
    assert out.splitlines()[-1] == "drifted above 0.25: age of diabetes-regressor, petal_length of iris-classifier"
    assert [row[:2] for row in table_rows(out)] == [["iris-classifier", "blue"], ["diabetes-regressor", "green"],
                                                    ["diabetes-regressor", "blue"]]


def test_one_models_drift_is_judged_alone(environments, prometheus, monkeypatch, capsys):
    """The retraining workflow asks model by model: iris-classifier's drift is no reason to retrain another."""
    monitored(environments, prometheus.server_port, threshold=0.5)
    prometheus.series = DRIFTED_IRIS
    code, out, err = run_cli(monkeypatch, capsys, "drift", "--stage", "dev", "--model", "diabetes-regressor",
                             "--environments", str(environments))
    assert (code, err) == (0, "")
    assert prometheus.queries == ['mlops:drift_psi:max{model="diabetes-regressor"}']
    assert [row[0] for row in table_rows(out)] == ["diabetes-regressor", "diabetes-regressor"]
    code, out, _ = run_cli(monkeypatch, capsys, "drift", "--stage", "dev", "--model", "iris-classifier",
                           "--environments", str(environments))
    assert code == 1 and out.splitlines()[-1] == "drifted above 0.5: petal_length of iris-classifier"


def test_a_model_the_stage_does_not_serve_is_one_line_and_exit_2(released_environments, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "drift", "--stage", "prod", "--model", "wine",
                             "--environments", str(released_environments))
    assert (code, out) == (2, "")
    assert err == (f"error: {released_environments}/prod.yaml: models: prod declares no model 'wine'; its models: "
                   "diabetes-regressor, iris-classifier (add models.<name> for a project under models/, "
                   "docs/models.md)\n")
    code, out, err = run_cli(monkeypatch, capsys, "drift", "--stage", "prod", "--model", "diabetes-regressor",
                             "--environments", str(released_environments))
    assert (code, out, err) == (2, "", "error: prod does not serve diabetes-regressor (models.diabetes-regressor has "
                                       "no release), so it has no drift to check\n")


def test_no_scores_yet_is_no_drift(environments, prometheus, monkeypatch, capsys):
    monitored(environments, prometheus.server_port)
    code, out, err = run_cli(monkeypatch, capsys, "drift", "--stage", "dev", "--environments", str(environments))
    assert (code, err) == (0, "")
    assert out == "dev: no drift scores yet (a replica reports them once its window holds 1000 rows)\n"


def test_a_stage_without_monitoring_is_one_line_and_exit_2(environments, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "drift", "--stage", "dev", "--environments", str(environments))
    assert (code, out) == (2, "")
    assert err == "error: dev declares no monitoring, so nothing measures its drift; add a 'monitoring' section\n"


def test_prometheus_not_answering_is_one_line_and_exit_2(environments, monkeypatch, capsys):
    port = free_port()
    monitored(environments, port)
    code, out, err = run_cli(monkeypatch, capsys, "drift", "--stage", "dev", "--environments", str(environments))
    assert (code, out) == (2, "")
    assert err.startswith(f"error: Prometheus at http://127.0.0.1:{port} did not answer: ")
    assert len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("args, expected", [
    (["--stage", "qa"], "/qa.yaml: no stage 'qa'; stages here: cluster, dev, prod, staging\n"),
    (["--stage", "../dev"], ": '../dev' is not a stage name: lowercase letters, digits and '-', starting with a "
                            "letter, at most 63 characters\n"),
])
def test_a_bad_stage_is_one_line_and_exit_2(environments, monkeypatch, capsys, args, expected):
    code, out, err = run_cli(monkeypatch, capsys, "drift", *args, "--environments", str(environments))
    assert (code, out) == (2, "")
    assert err == f"error: {environments}{expected}"


def test_the_retraining_workflow_trains_and_proposes_a_promotion_only_on_drift():
    workflow = yaml.safe_load((REPO_ROOT / ".github" / "workflows" / "retrain.yml").read_text())
    assert workflow[True]["schedule"], "it runs on a schedule"  # PyYAML reads the key `on` as a boolean
    drift, retrain = workflow["jobs"]["drift"], workflow["jobs"]["retrain"]
    check = next(step for step in drift["steps"] if step.get("id") == "drift")["run"]
    assert '.venv/bin/mlops drift --stage "$STAGE" --model "$model"' in check
    assert 'if [ "$status" -ge 2 ]; then exit "$status"; fi' in check, "a check that cannot run fails the job"
    assert retrain["needs"] == "drift" and retrain["if"].startswith("needs.drift.outputs.drifted == 'true'")
    commands = "\n".join(step.get("run", "") for step in retrain["steps"])
    assert '.venv/bin/mlops train --stage "$BUILDER" --model "$MODEL"' in commands
    assert '.venv/bin/mlops promote --from "$BUILDER" --to "$NEXT"' in commands
    assert "gh pr create --base main" in commands
    assert retrain["permissions"] == {"contents": "write", "pull-requests": "write"}
    assert workflow["permissions"] == {"contents": "read"}, "only the retraining job may push"
