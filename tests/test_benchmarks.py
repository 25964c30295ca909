"""Smoke tests of the benchmark harness at tiny sizes: it runs and its parsing is right. No timing is
asserted: the numbers belong in BENCHMARKS.md (`make bench`), not in the test suite."""
from __future__ import annotations

import http.server
import pickle
import threading

import pytest
from sklearn.datasets import load_diabetes

from benchmarks import builds, loadgen, model, overhead, rebuilds, serving, stage
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
    spec = stage.dev_spec(image_registry=False, docker_chooses_ports=True)
    assert spec.serving.port.host_port is None and spec.model_registry.port.host_port is None
    images = builds.stage_builds("bench", spec)
    assert {"training", "serving", "mlflow", "gateway"} <= images.keys()
    assert images["serving"].target == spec.serving.runtime


def test_dev_as_shipped_serves_both_models_and_a_stage_can_keep_one():
    shipped = stage.dev_spec(image_registry=False, docker_chooses_ports=True)
    assert stage.served(shipped) == [model.REGRESSOR_NAME, model.MODEL_NAME]
    alone = stage.dev_spec(image_registry=False, docker_chooses_ports=True, models=(model.MODEL_NAME,))
    assert stage.served(alone) == [model.MODEL_NAME]
    assert alone.models[model.MODEL_NAME] == shipped.models[model.MODEL_NAME]
    rendered = {resource.inputs.get("name") for resource in plan.render("bench", alone)}
    assert "bench-iris-classifier-blue-0" in rendered
    assert not any(str(name).startswith(f"bench-{model.REGRESSOR_NAME}") for name in rendered)
    with pytest.raises(ValueError, match="declares no model nope"):
        stage.dev_spec(models=("nope",))


def test_replica_names_are_the_containers_the_program_renders():
    spec = stage.dev_spec(image_registry=False, docker_chooses_ports=True)
    containers = {resource.inputs["name"] for resource in plan.render("bench", spec)
                  if resource.type == "docker:index/container:Container"}
    assert {stage.first_replica("bench", name) for name in stage.served(spec)} <= containers


def test_every_served_model_gets_a_payload_that_predicts_its_own_features():
    spec = stage.dev_spec(image_registry=False, docker_chooses_ports=True)
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
    images = builds.stage_builds("bench", stage.dev_spec(image_registry=False, docker_chooses_ports=True))
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
    images = builds.stage_builds("bench", stage.dev_spec(image_registry=False, docker_chooses_ports=True))
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
               for label, rate in rates.items() for rows in serving.ROWS for connections in serving.CONCURRENCY}
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
               for label, rate in rates.items() for rows in serving.ROWS for connections in serving.CONCURRENCY}
    figure = serving.table(servers, samples, rounds=1, duration_s=1)
    assert [row[2] for row in figure.rows[:3]] == list(rates)
    note = next(note for note in figure.notes if note.startswith("gateway, two models against gateway"))
    assert note.count("0.97×") == len(serving.ROWS) * len(serving.CONCURRENCY)
    assert note.endswith("Goal (at least 0.95× in every cell): met.")
    samples[serving.Cell("gateway, two models", 100, 32)] = [loadgen.LoadResult(270.0, 1.0, 2.0)]
    missed = serving.table(servers, samples, rounds=1, duration_s=1)
    assert "100 row(s) at concurrency 32: 0.90×" in missed.notes[1] and missed.notes[1].endswith("missed.")
    assert "0.95×" in missed.goal
