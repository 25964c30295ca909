"""Smoke tests of the benchmark harness at tiny sizes: it runs and its parsing is right. No timing is
asserted: the numbers belong in BENCHMARKS.md (`make bench`), not in the test suite."""
from __future__ import annotations

import http.server
import threading

import pytest

from benchmarks import builds, loadgen, overhead, serving, stage

CLASSIC_BUILD_OUTPUT = """\
Step 1/5 : ARG BASE_IMAGE=mlops-base:bookworm
Step 2/5 : FROM ${BASE_IMAGE}
 ---> 48751674c2cd
Step 3/5 : COPY requirements.lock /build/
 ---> Using cache
 ---> 1a2b3c4d5e6f
Step 4/5 : COPY mlops_training/ /opt/training/mlops_training/
 ---> 9f8e7d6c5b4a
Step 5/5 : ENTRYPOINT ["python3", "-m", "mlops_training"]
 ---> Running in 0123456789ab
Removing intermediate container 0123456789ab
 ---> abcdefabcdef
Successfully built abcdefabcdef
"""


def test_build_steps_are_classified_as_cached_or_executed():
    executed, cached = builds.classify_steps(CLASSIC_BUILD_OUTPUT)
    assert executed == ["COPY mlops_training/ /opt/training/mlops_training/",
                        'ENTRYPOINT ["python3", "-m", "mlops_training"]']
    assert cached == 1


def test_the_serving_stage_builds_what_dev_builds_and_publishes_nothing_fixed():
    spec = stage.dev_spec(image_registry=False, docker_chooses_ports=True)
    assert spec.serving.port.host_port is None and spec.model_registry.port.host_port is None
    images = builds.stage_builds("bench", spec)
    assert {"training", "serving", "mlflow", "gateway"} <= images.keys()
    assert images["serving"].target == spec.serving.runtime


def test_overhead_figure_runs_every_command():
    figure = overhead.measure(rounds=1)
    assert [row[0] for row in figure.rows] == ["`mlops plan prod`",
                                               "the same CLI with everything `mlops` imports, declaring nothing",
                                               "empty program (the floor)"]
    assert figure.rows[-1][2] == "1.00×"
    assert figure.markdown().startswith("## Program overhead")


class _Answers200(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):  # noqa: N802 - the http.server hook name
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.mark.skipif(not loadgen.wrk_available(), reason="needs wrk (Debian package wrk)")
def test_load_generator_reports_throughput_and_latency():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers200)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = loadgen.post_load(f"http://127.0.0.1:{server.server_address[1]}/", b'{"inputs": []}',
                                   connections=2, duration_s=1)
    finally:
        server.shutdown()
    assert result.requests_per_s > 0 and 0 < result.p50_ms <= result.p99_ms


def test_serving_table_compares_against_the_fastest_competitor():
    labels = {"gateway": False, "direct": False, "mlserver": True, "mlflow": True}
    servers = [serving.Server(label, "http://unused", serving.v2_body, serving.v2_predictions, competitor)
               for label, competitor in labels.items()]
    rates = {"gateway": 300.0, "direct": 400.0, "mlserver": 100.0, "mlflow": 150.0}
    samples = {serving.Cell(label, rows, connections): [loadgen.LoadResult(rate, 1.0, 2.0)] * 2
               for label, rate in rates.items() for rows in serving.ROWS for connections in serving.CONCURRENCY}
    rows_per_call = {cell: [1.0, 4.0, 9.0] for cell in samples if cell.server == "direct"}
    figure = serving.table(servers, samples, rounds=2, duration_s=1, rows_per_call=rows_per_call)
    assert len(figure.rows) == len(samples)
    assert {row[2]: row[-1] for row in figure.rows[:4]} == {
        "gateway": "2.00×", "direct": "2.67×", "mlserver": "0.67×", "mlflow": "1.00×"}
    assert {row[2]: row[-2] for row in figure.rows[:4]} == {"gateway": "–", "direct": "4.0", "mlserver": "–",
                                                            "mlflow": "–"}
    assert "1 row(s): 2.00× mlflow (aim met)" in figure.notes[0]
