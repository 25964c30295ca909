"""Smoke tests of the benchmark harness at tiny sizes: it runs and its parsing is right. No timing is
asserted: the numbers belong in BENCHMARKS.md (`make bench`), not in the test suite."""
from __future__ import annotations

import http.server
import pickle
import threading

import pytest
from sklearn.datasets import load_diabetes

from benchmarks import builds, gateway_hop, loadgen, model, overhead, rebuilds, serving, stage
from mlops import plan

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
    spec = stage.dev_spec(docker_chooses_ports=True)
    assert spec.serving.port.host_port is None and spec.model_registry.port.host_port is None
    images = builds.stage_builds("bench", spec)
    assert {"training", "serving", "mlflow", "gateway"} <= images.keys()
    assert images["serving"].target == spec.serving.runtime


def test_dev_as_shipped_serves_both_models_and_a_stage_can_keep_one():
    shipped = stage.dev_spec(docker_chooses_ports=True)
    assert stage.served(shipped) == [model.REGRESSOR_NAME, model.MODEL_NAME]
    alone = stage.dev_spec(docker_chooses_ports=True, models=(model.MODEL_NAME,))
    assert stage.served(alone) == [model.MODEL_NAME]
    assert alone.models[model.MODEL_NAME] == shipped.models[model.MODEL_NAME]
    rendered = {resource.inputs.get("name") for resource in plan.render("bench", alone)}
    assert "bench-iris-classifier-blue-0" in rendered
    assert not any(str(name).startswith(f"bench-{model.REGRESSOR_NAME}") for name in rendered)
    with pytest.raises(ValueError, match="declares no model nope"):
        stage.dev_spec(models=("nope",))


def test_replica_names_are_the_containers_the_program_renders():
    spec = stage.dev_spec(docker_chooses_ports=True)
    containers = {resource.inputs["name"] for resource in plan.render("bench", spec)
                  if resource.type == "docker:index/container:Container"}
    assert {stage.first_replica("bench", name) for name in stage.served(spec)} <= containers


def test_the_deploy_waits_for_every_container_it_started_and_for_no_secrets_writer():
    class Deployed:
        def __init__(self, status: str) -> None:
            self.status = status

    spec = stage.dev_spec(docker_chooses_ports=True)
    containers = {resource.inputs["name"]: Deployed("running" if resource.inputs.get("start", True) else "created")
                  for resource in plan.render("bench", spec) if resource.type == "docker:index/container:Container"}
    writers = {name for name, container in containers.items() if container.status == "created"}
    assert "bench-model-registry-secrets" in writers
    waited = stage.started(containers)
    assert {name for name, container in containers.items() if container in waited} == containers.keys() - writers


def test_every_served_model_gets_a_payload_that_predicts_its_own_features():
    spec = stage.dev_spec(docker_chooses_ports=True)
    trained = model.payloads(stage.served(spec))
    stage.check_payloads(spec, trained)
    classifier, regressor = pickle.loads(trained[model.MODEL_NAME]), pickle.loads(trained[model.REGRESSOR_NAME])
    assert set(classifier.predict(model.sample_rows(150))) == {0, 1, 2}
    assert classifier.n_features_in_ == model.FEATURES and regressor.n_features_in_ == 10
    features, targets = load_diabetes(return_X_y=True)
    assert regressor.score(features, targets) > 0.4  # a fitted regressor (R²), not a constant
    with pytest.raises(ValueError, match="serves iris-classifier too"):
        stage.check_payloads(spec, {model.REGRESSOR_NAME: trained[model.REGRESSOR_NAME]})
    with pytest.raises(ValueError, match="no payload for nope"):
        model.payloads(["nope"])


def test_model_images_build_from_the_platform_image_built_before_them(monkeypatch):
    images = builds.stage_builds("bench", stage.dev_spec(docker_chooses_ports=True))
    model_image = images["iris-classifier-serving"]
    assert model_image.dockerfile is not None and model_image.dockerfile.parts[-3:] == ("images", "model", "Dockerfile")
    built: list[tuple[str, dict[str, str]]] = []
    monkeypatch.setattr(builds, "build", lambda image, tag, no_cache=False: built.append((tag, image.args)))
    builds.build_all(images, lambda name: f"mine/{name}:x")
    order = [tag for tag, _ in built]
    assert set(order) == {f"mine/{name}:x" for name in images}
    for tag, args in built:
        if builds.PLATFORM_ARG in args:
            assert args[builds.PLATFORM_ARG] in order[:order.index(tag)]
    assert dict(built)["mine/iris-classifier-serving:x"][builds.PLATFORM_ARG] == "mine/serving:x"


def test_rebuilds_edit_files_the_images_copy():
    images = builds.stage_builds("bench", stage.dev_spec(docker_chooses_ports=True))
    for name, code_file in rebuilds.CODE_FILES.items():
        assert (images[name].context / code_file).is_file()


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
               for label, rate in rates.items() for rows, connections in serving.CELLS}
    rows_per_call = {cell: [1.0, 4.0, 9.0] for cell in samples if cell.server == "direct"}
    figure = serving.table(servers, samples, rounds=2, duration_s=1, rows_per_call=rows_per_call)
    assert len(figure.rows) == len(samples)
    assert {row[2]: row[-1] for row in figure.rows[:4]} == {
        "gateway": "2.00×", "direct": "2.67×", "mlserver": "0.67×", "mlflow": "1.00×"}
    assert {row[2]: row[-2] for row in figure.rows[:4]} == {"gateway": "–", "direct": "4.0", "mlserver": "–",
                                                            "mlflow": "–"}
    assert "1 row(s): 2.00× mlflow (aim met)" in figure.notes[0]


def test_serving_table_holds_the_two_model_gateway_against_the_single_model_one():
    single = "gateway"
    servers = [serving.Server(single, "http://unused", serving.v2_body, serving.v2_predictions, False),
               serving.Server("gateway, two models", "http://unused", serving.v2_body, serving.v2_predictions, False,
                              compared_with=single),
               serving.Server("mlserver", "http://unused", serving.v2_body, serving.v2_predictions, True)]
    rates = {"gateway": 300.0, "gateway, two models": 291.0, "mlserver": 100.0}
    samples = {serving.Cell(label, rows, connections): [loadgen.LoadResult(rate, 1.0, 2.0)]
               for label, rate in rates.items() for rows, connections in serving.CELLS}
    figure = serving.table(servers, samples, rounds=1, duration_s=1)
    assert [row[2] for row in figure.rows[:3]] == list(rates)
    note = next(note for note in figure.notes if note.startswith("gateway, two models against gateway"))
    assert note.count("0.97×") == len(serving.CELLS)
    assert note.endswith("Goal (at least 0.95× in every cell): met.")
    samples[serving.Cell("gateway, two models", 100, 32)] = [loadgen.LoadResult(270.0, 1.0, 2.0)]
    missed = serving.table(servers, samples, rounds=1, duration_s=1)
    assert "100 row(s) at concurrency 32: 0.90×" in missed.notes[1] and missed.notes[1].endswith("missed.")
    assert "0.95×" in missed.goal


def _servers_for_batching_goals(gateway_limit: int | None = None) -> list[serving.Server]:
    def server(label: str, **fields) -> serving.Server:
        return serving.Server(label, "http://unused", serving.v2_body, serving.v2_predictions,
                              fields.pop("competitor", False), **fields)
    return [server("gateway", max_connections=gateway_limit),
            server("direct"),
            server("direct, batching", batching_of="direct"),
            server("gateway, batching", max_connections=gateway_limit, batching_gateway=True),
            server("stock", competitor=True, stock_mlserver=True),
            server("stock, batching", competitor=True, stock_mlserver=True),
            server("mlflow", competitor=True)]


def test_gateway_rows_stop_at_its_limit_per_client_and_the_rest_are_measured_at_every_cell():
    servers = _servers_for_batching_goals(gateway_limit=32)
    samples = {serving.Cell(server.label, rows, connections): [loadgen.LoadResult(100.0, 1.0, 2.0)]
               for server in servers for rows, connections in serving.CELLS if server.measured_at(connections)}
    figure = serving.table(servers, samples, rounds=1, duration_s=1)
    at_128 = [row[2] for row in figure.rows if row[1] == "128"]
    assert at_128 == ["direct", "direct, batching", "stock", "stock, batching", "mlflow"]
    assert [row[2] for row in figure.rows if row[1] == "32"].count("gateway, batching") == 2  # 1 and 100 rows


def test_batching_goals_are_judged_from_the_cells_they_name():
    servers = _servers_for_batching_goals()
    # p50 and p99 by server; requests/s by server and concurrency.
    rate = {"gateway": 1500.0, "direct": 2500.0, "direct, batching": 8500.0, "gateway, batching": 3000.0,
            "stock": 1000.0, "stock, batching": 1100.0, "mlflow": 800.0}
    samples = {serving.Cell(label, rows, connections): [loadgen.LoadResult(value, 1.0, 10.0)]
               for label, value in rate.items() for rows, connections in serving.CELLS}
    samples[serving.Cell("direct, batching", 1, 1)] = [loadgen.LoadResult(2500.0, 1.05, 10.0 + serving.MAX_BATCH_TIME_MS)]
    notes = serving.batching_verdicts(servers, samples)
    assert notes[0].startswith("At concurrency 32, 1 row: gateway, batching answers 2.73× the requests/s of the "
                               "faster stock MLServer (stock, batching)") and notes[0].endswith("met.")
    assert "8500 requests/s per CPU; goal > 8000: met." in notes[1]
    assert notes[2].endswith("goal within 10 %: met.") and "1.05 ms with batching, 1.00 ms without" in notes[2]
    assert notes[3].endswith("goal within it at every concurrency: met.")

    samples[serving.Cell("stock, batching", 1, 32)] = [loadgen.LoadResult(1500.0, 1.0, 10.0)]
    samples[serving.Cell("direct, batching", 1, 32)] = [loadgen.LoadResult(7900.0, 1.0, 12.5)]
    samples[serving.Cell("direct, batching", 1, 1)] = [loadgen.LoadResult(2500.0, 1.2, 10.0)]
    missed = serving.batching_verdicts(servers, samples)
    assert [note.rsplit(" ", 1)[1] for note in missed] == ["missed."] * 4
    assert "concurrency 32: 12.50 ms vs 12.00 ms" in missed[3]


def test_hop_figure_counts_only_processes_that_ran_through_the_measurement():
    before = {"gateway": {10: ("nginx", 100), 11: ("nginx", 5), 12: ("python3", 50), 13: ("python3", 7)},
              "replica": {20: ("python", 1000)}}
    # 13 (a health check) ended, 14 started meanwhile: neither is counted.
    after = {"gateway": {10: ("nginx", 200), 11: ("nginx", 5), 12: ("python3", 70), 14: ("python3", 30)},
             "replica": {20: ("python", 1400)}}
    requests = 1000.0
    spent = gateway_hop.cpu_per_request(before, after, requests)
    per_tick_us = 1e6 / gateway_hop.CLOCK_TICKS / requests
    assert spent == gateway_hop.CpuPerRequest(nginx_us=100 * per_tick_us, exporter_us=20 * per_tick_us,
                                              replica_us=400 * per_tick_us)
    direct_only = gateway_hop.cpu_per_request({"replica": before["replica"]}, {"replica": after["replica"]}, requests)
    assert direct_only.nginx_us == direct_only.exporter_us == 0.0


def test_hop_table_holds_each_gateway_path_against_the_replica_directly():
    paths = [gateway_hop.HopPath("direct", None, None), gateway_hop.HopPath("gateway", None, object()),
             gateway_hop.HopPath("gateway, own CPU", None, object())]
    rates = {"direct": 2000.0, "gateway": 1500.0, "gateway, own CPU": 1900.0}
    results = {(label, connections): [loadgen.LoadResult(rate, 1.0, 2.0)]
               for label, rate in rates.items() for connections in gateway_hop.CONCURRENCY}
    cpu = {key: [gateway_hop.CpuPerRequest(110.0, 20.0, 400.0)] for key in results}
    figure = gateway_hop.table(paths, results, cpu, rounds=1, duration_s=1)
    assert len(figure.rows) == len(results)
    assert [row[5] for row in figure.rows[:3]] == ["1.00×", "0.75×", "0.95×"]
    assert [row[6] for row in figure.rows[:3]] == ["–", "110", "110"]
    assert figure.notes[0] == "Goal at concurrency 8: gateway: 0.75× (missed); gateway, own CPU: 0.95× (met)."
