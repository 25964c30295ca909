"""Figure 1: requests/s and p50/p99 latency of V2 infer requests against one scikit-learn model, served
by this stack (its gateway, the gateway of a stage that serves a second model too, a replica directly with
and without batching, and the gateway in front of the batching replica), MLServer's scikit-learn runtime as its users run it (with and without its adaptive
batching) and behind this project's layer, and `mlflow models serve`."""
from __future__ import annotations

import dataclasses
import json
import tempfile
import urllib.request
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from benchmarks import builds, loadgen
from benchmarks import stage as bench_stage
from benchmarks.model import FEATURES, MODEL_NAME, REGRESSOR_NAME, model_bytes, sample_rows
from benchmarks.report import Figure, median, ratio, rounds_text, spread
from mlops_spec.contract import SERVING_METRICS_PORT, SERVING_PORT, GatewayEnv, gateway_name
from mlops_spec.models import StageSpec

SERVER_CPU = "1"
ROWS = (1, 100)
# (rows per request, concurrency): 1 row up to concurrency 128, where batching has the most company to form.
CELLS = tuple((1, connections) for connections in (1, 8, 32, 128)) + tuple((100, connections) for connections in (1, 8, 32))
# The gateway admits this many requests in flight per client address and answers 429 past them (limit_conn
# requests_per_client in images/gateway/nginx.conf.template); every request here comes from one address.
GATEWAY_IN_FLIGHT_PER_CLIENT = 32
HEADLINE_CONCURRENCY = 8
MLFLOW_SERVE_CONTEXT = Path(__file__).with_name("mlflow_serve")
STOCK_MLSERVER_CONTEXT = Path(__file__).with_name("mlserver_stock")
# The same limits for the replica's batching and MLServer's (which counts requests, not rows: the same here,
# at one row per request).
MAX_BATCH_SIZE = 32
MAX_BATCH_TIME_MS = 2
V2_INFER_PATH = f"/v2/models/{MODEL_NAME}/infer"
# Issue 20's batching goals at 1 row per request: at this concurrency the gateway path against the faster stock
# MLServer configuration, and the batching replica's requests/s per CPU (it is pinned to one).
BATCHING_CONCURRENCY = 32
GATEWAY_VS_STOCK_GOAL = 2.5
BATCHED_GOAL_PER_CPU = 8000
# With a second model in the stage, the gateway keeps at least this share of its single-model requests/s (issue 17).
TWO_MODELS_GOAL = 0.95


def v2_body(rows: list[list[float]]) -> bytes:
    tensor = {"name": "input-0", "shape": [len(rows), FEATURES], "datatype": "FP64",
              "data": [value for row in rows for value in row]}
    return json.dumps({"inputs": [tensor]}).encode()


def mlflow_body(rows: list[list[float]]) -> bytes:
    """MLflow's scoring server has its own format: a tensor input is a nested list under `inputs`."""
    return json.dumps({"inputs": rows}).encode()


@dataclass(frozen=True)
class Server:
    label: str
    url: str
    body: Callable[[list[list[float]]], bytes]
    predictions: Callable[[dict], list]
    competitor: bool
    """MLServer and MLflow: the reference the stack's numbers are compared against."""
    replica_metrics: str | None = None
    """The metrics URL of the `oip` replica that predicts for this server: its `oip_batch_size` histogram tells
    the rows per predict call it formed."""
    compared_with: str | None = None
    """The label of the server this one is held against in the notes: the single-model gateway, for the gateway
    of the stage with two models."""
    max_connections: int | None = None
    """The most connections it is measured with: the gateway's limit per client address."""
    stock_mlserver: bool = False
    """MLServer as its users run it: the peers the batching goals are held against."""
    batching_of: str | None = None
    """For a replica with batching on, the label of the same replica without it."""
    batching_gateway: bool = False
    """The gateway in front of a replica with batching on: the path issue 20's goal against MLServer is about."""

    def measured_at(self, connections: int) -> bool:
        return self.max_connections is None or connections <= self.max_connections

    def predict(self, rows: list[list[float]]) -> list:
        request = urllib.request.Request(self.url, data=self.body(rows), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return self.predictions(json.loads(response.read()))


def v2_predictions(answer: dict) -> list:
    return answer["outputs"][0]["data"]


def mlflow_predictions(answer: dict) -> list:
    return answer["predictions"]


def container_env(container) -> dict[str, str]:
    """The environment `container` was started with."""
    container.reload()
    return dict(item.split("=", 1) for item in container.attrs["Config"]["Env"])


def container_address(container) -> str:
    container.reload()
    return next(iter(container.attrs["NetworkSettings"]["Networks"].values()))["IPAddress"]


def start_like(replica, name: str, image: str, environment: dict[str, str], command: list[str] | None = None,
               hardened: bool = True, cpu: str = SERVER_CPU):
    """`image` as a sibling of the stack's `replica`: same network and limits, pinned to `cpu`; `hardened`,
    also the same user and hardening (read-only root, no capabilities)."""
    host = replica.attrs["HostConfig"]
    stack = replica.labels["mlops.stack"]
    hardening = dict(user=replica.attrs["Config"]["User"], read_only=host["ReadonlyRootfs"], tmpfs=host["Tmpfs"],
                     security_opt=host["SecurityOpt"], cap_drop=host["CapDrop"]) if hardened else {}
    return replica.client.containers.run(
        image, command, name=f"{stack}-{name}", detach=True, mem_limit=host["Memory"], nano_cpus=host["NanoCpus"],
        cpuset_cpus=cpu, environment=environment, network=next(iter(replica.attrs["NetworkSettings"]["Networks"])),
        labels={"mlops.stack": stack}, **hardening)


def stock_mlserver_repositories(payload: bytes, into: Path) -> None:
    """One MLServer model repository per configuration: MLServer's defaults, and its adaptive batching on.
    Both set `parallel_workers: 0`: MLServer 1.7.1's default inference worker process dies at start under the
    uvloop its lock resolves to (0.23: "There is no current event loop in thread 'MainThread'"), so its users
    run it so too."""
    for repository, batching in (("one-call-per-request", {}),
                                 ("adaptive-batching", {"max_batch_size": MAX_BATCH_SIZE,
                                                        "max_batch_time": MAX_BATCH_TIME_MS / 1000})):
        model = into / repository / MODEL_NAME
        model.mkdir(parents=True)
        (into / repository / "settings.json").write_text(json.dumps({"parallel_workers": 0}))
        (model / "model.pkl").write_bytes(payload)
        (model / "model-settings.json").write_text(json.dumps({
            "name": MODEL_NAME, "implementation": "mlserver_sklearn.SKLearnModel",
            "parameters": {"uri": "./model.pkl"}, **batching}))


def build_competitor_images(spec: StageSpec, payload: bytes) -> dict[str, str]:
    """MLServer from the serving image's `mlserver` target, stock MLServer built FROM it, and `mlflow models
    serve` with the model baked in; returns their tags."""
    tags = {"mlserver": "mlops-bench/serving:mlserver", "mlserver-stock": "mlops-bench/mlserver-stock:latest",
            "mlflow-serve": "mlops-bench/mlflow-serve:latest"}
    serving_image = builds.stage_builds("bench", spec)["serving"]
    builds.build(dataclasses.replace(serving_image, target="mlserver"), tags["mlserver"])
    mlflow_serve = builds.ImageBuild(name="mlflow-serve", context=MLFLOW_SERVE_CONTEXT, args=serving_image.args)
    stock = builds.ImageBuild(name="mlserver-stock", context=STOCK_MLSERVER_CONTEXT,
                              args={"MLSERVER_IMAGE": tags["mlserver"]})
    with tempfile.TemporaryDirectory(prefix="bench-mlflow-serve-") as scratch:
        with_model = builds.copied(mlflow_serve, Path(scratch) / "context")
        (with_model.context / "model.pkl").write_bytes(payload)
        builds.build(with_model, tags["mlflow-serve"])
        with_models = builds.copied(stock, Path(scratch) / "stock")
        stock_mlserver_repositories(payload, with_models.context / "models")
        builds.build(with_models, tags["mlserver-stock"])
    return tags


@contextmanager
def running_servers() -> Iterator[list[Server]]:
    """The stage serving iris alone (MLflow, one `oip` replica, its gateway), dev as shipped serving the regressor
    too (one replica each), a replica batching and a gateway in front of it, MLServer stock (with and without
    adaptive batching) and behind the layer, and `mlflow models serve`, all pinned to SERVER_CPU."""
    payload = model_bytes()
    spec = bench_stage.dev_spec(docker_chooses_ports=True, models=(MODEL_NAME,))
    images = build_competitor_images(spec, payload)
    with ExitStack() as stages:
        stage, started = stages.enter_context(bench_stage.deployed("serving", spec, cpus=SERVER_CPU))
        two_models_spec = bench_stage.dev_spec(docker_chooses_ports=True)
        if set(bench_stage.served(two_models_spec)) != {MODEL_NAME, REGRESSOR_NAME}:
            raise RuntimeError(f"dev should serve {MODEL_NAME} and {REGRESSOR_NAME}, "
                               f"not {bench_stage.served(two_models_spec)}")
        two_models, two_started = stages.enter_context(bench_stage.deployed("serving2", two_models_spec,
                                                                            cpus=SERVER_CPU))
        replica = started[bench_stage.first_replica(stage.stack, MODEL_NAME)]
        gateway = started[gateway_name(stage.stack)]
        environment = container_env(replica)
        batched = start_like(replica, "serving-batched", replica.image.id,
                             {**environment, "MAX_BATCH_SIZE": str(MAX_BATCH_SIZE), "MAX_BATCH_TIME_MS": str(MAX_BATCH_TIME_MS)})
        mlserver = start_like(replica, "mlserver", images["mlserver"], {**environment, "SERVING_RUNTIME": "mlserver"})
        # The stage's gateway again, routing to the batching replica.
        gateway_environment = container_env(gateway)
        routes = json.loads(gateway_environment[GatewayEnv.MODELS])
        for route in routes:
            route["blue"] = [f"{batched.name}:{SERVING_PORT}"]
        batching_gateway = start_like(gateway, "gateway-batched", gateway.image.id,
                                      {**gateway_environment, GatewayEnv.MODELS: json.dumps(routes)})
        stock = {repository: start_like(replica, f"mlserver-{repository}", images["mlserver-stock"], {},
                                        command=["mlserver", "start", f"/opt/models/{repository}"], hardened=False)
                 for repository in ("one-call-per-request", "adaptive-batching")}
        mlflow_serve = start_like(replica, "mlflow-serve", images["mlflow-serve"], {})
        for v2_server in (batched, mlserver, *stock.values(), batching_gateway):
            bench_stage.wait_ready(f"http://{container_address(v2_server)}:8080/v2/health/ready", 180)
        bench_stage.wait_ready(f"http://{container_address(mlflow_serve)}:8080/health", 180)

        def v2(label: str, container, competitor: bool, predicting=None, **roles) -> Server:
            """`predicting`: the `oip` replica whose predict calls this server's requests become; `roles`: the
            server's other fields (what it is held against, its connection limit)."""
            metrics = None if predicting is None else f"http://{container_address(predicting)}:{SERVING_METRICS_PORT}/metrics"
            return Server(label, f"http://{container_address(container)}:8080{V2_INFER_PATH}", v2_body, v2_predictions,
                          competitor=competitor, replica_metrics=metrics, **roles)

        batching = f"{MAX_BATCH_SIZE} rows, {MAX_BATCH_TIME_MS} ms"
        single_gateway = "ours: gateway → oip replica"
        yield [
            v2(single_gateway, gateway, competitor=False, predicting=replica,
               max_connections=GATEWAY_IN_FLIGHT_PER_CLIENT),
            v2(f"ours: gateway → oip replica, two models in the stage ({REGRESSOR_NAME} too)",
               two_started[gateway_name(two_models.stack)], competitor=False,
               predicting=two_started[bench_stage.first_replica(two_models.stack, MODEL_NAME)],
               compared_with=single_gateway, max_connections=GATEWAY_IN_FLIGHT_PER_CLIENT),
            v2("ours: oip replica directly", replica, competitor=False, predicting=replica),
            v2(f"ours: oip replica directly, batching ({batching})", batched, competitor=False, predicting=batched,
               batching_of="ours: oip replica directly"),
            v2(f"ours: gateway → oip replica with batching ({batching})", batching_gateway, competitor=False,
               predicting=batched, max_connections=GATEWAY_IN_FLIGHT_PER_CLIENT, batching_gateway=True),
            v2("MLServer as its users run it (`mlserver start`)", stock["one-call-per-request"], competitor=True,
               stock_mlserver=True),
            v2(f"MLServer as its users run it, adaptive batching ({batching})", stock["adaptive-batching"],
               competitor=True, stock_mlserver=True),
            v2("MLServer behind this project's layer (the serving image's `mlserver` target)", mlserver,
               competitor=False),
            Server("`mlflow models serve`", f"http://{container_address(mlflow_serve)}:8080/invocations",
                   mlflow_body, mlflow_predictions, competitor=True),
        ]


def predict_calls(metrics_url: str) -> tuple[float, float]:
    """The replica's predict calls and the rows they predicted so far."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        samples = dict(line.split(" ", 1) for line in response.read().decode().splitlines()
                       if line.startswith(("oip_batch_size_count ", "oip_batch_size_sum ")))
    return float(samples["oip_batch_size_count"]), float(samples["oip_batch_size_sum"])


def check_same_predictions(servers: list[Server]) -> None:
    rows = sample_rows(max(ROWS))
    answers = {server.label: server.predict(rows) for server in servers}
    if len({json.dumps(answer) for answer in answers.values()}) != 1:
        raise RuntimeError(f"the servers disagree on the same rows: {answers}")


@dataclass(frozen=True)
class Cell:
    server: str
    rows: int
    connections: int


def measure(rounds: int = 3, duration_s: int = 5, warmup_s: int = 1) -> Figure:
    samples: dict[Cell, list[loadgen.LoadResult]] = {}
    rows_per_call: dict[Cell, list[float]] = {}
    with running_servers() as servers:
        check_same_predictions(servers)
        bodies = {(server.label, rows): server.body(sample_rows(rows)) for server in servers for rows in ROWS}
        for server in servers:
            loadgen.post_load(server.url, bodies[server.label, 1], HEADLINE_CONCURRENCY, warmup_s)
        # Innermost loop over servers: each round runs A, B, C, D back to back for every setting.
        for _ in range(rounds):
            for rows, connections in CELLS:
                for server in (server for server in servers if server.measured_at(connections)):
                        cell = Cell(server.label, rows, connections)
                        before = predict_calls(server.replica_metrics) if server.replica_metrics else None
                        result = loadgen.post_load(server.url, bodies[server.label, rows], connections, duration_s)
                        samples.setdefault(cell, []).append(result)
                        if before is not None and server.replica_metrics:
                            calls, predicted = (after - previous for after, previous in
                                                zip(predict_calls(server.replica_metrics), before))
                            rows_per_call.setdefault(cell, []).append(predicted / calls)
    return table(servers, samples, rounds, duration_s, rows_per_call)


def batching_verdicts(servers: list[Server], samples: dict[Cell, list[loadgen.LoadResult]]) -> list[str]:
    """Issue 20's goals for 1 row per request, each with its verdict: at concurrency 32 the gateway path (in front of
    the batching replica, when the figure has one) against the faster stock MLServer and the batching replica against BATCHED_GOAL_PER_CPU; at concurrency 1 the batching
    replica's p50 against the same replica's without batching, and at every concurrency its p99 against the same
    plus the batch time."""
    def rate(label: str, connections: int) -> float:
        return median(r.requests_per_s for r in samples[Cell(label, 1, connections)])

    def latency(label: str, connections: int, percentile: str) -> float:
        return median(getattr(r, percentile) for r in samples[Cell(label, 1, connections)])

    def verdict(met: bool) -> str:
        return "met" if met else "missed"

    notes = []
    stock = [server for server in servers if server.stock_mlserver]
    gateway = next((server for server in servers if server.batching_gateway), servers[0])
    if stock:
        faster = max(stock, key=lambda server: rate(server.label, BATCHING_CONCURRENCY))
        versus = rate(gateway.label, BATCHING_CONCURRENCY) / rate(faster.label, BATCHING_CONCURRENCY)
        notes.append(f"At concurrency {BATCHING_CONCURRENCY}, 1 row: {gateway.label} answers {versus:.2f}× the "
                     f"requests/s of the faster stock MLServer ({faster.label}); goal ≥ {GATEWAY_VS_STOCK_GOAL}×: "
                     f"{verdict(versus >= GATEWAY_VS_STOCK_GOAL)}.")
    for batched in (server for server in servers if server.batching_of is not None):
        alone = str(batched.batching_of)
        per_cpu = rate(batched.label, BATCHING_CONCURRENCY)  # pinned to one CPU
        notes.append(f"At concurrency {BATCHING_CONCURRENCY}, 1 row: {batched.label} answers {per_cpu:.0f} requests/s "
                     f"per CPU; goal > {BATCHED_GOAL_PER_CPU}: {verdict(per_cpu > BATCHED_GOAL_PER_CPU)}.")
        p50, p50_alone = latency(batched.label, 1, "p50_ms"), latency(alone, 1, "p50_ms")
        notes.append(f"At concurrency 1: p50 {p50:.2f} ms with batching, {p50_alone:.2f} ms without; goal within "
                     f"10 %: {verdict(p50 <= 1.1 * p50_alone)}.")
        p99s = [(connections, latency(batched.label, connections, "p99_ms"), latency(alone, connections, "p99_ms"))
                for rows, connections in CELLS if rows == 1]
        notes.append("p99 with batching against without plus the batch time (" + "; ".join(
            f"concurrency {connections}: {with_:.2f} ms vs {without + MAX_BATCH_TIME_MS:.2f} ms"
            for connections, with_, without in p99s) + "); goal within it at every concurrency: "
            + verdict(all(with_ <= without + MAX_BATCH_TIME_MS for _, with_, without in p99s)) + ".")
    return notes


def table(servers: list[Server], samples: dict[Cell, list[loadgen.LoadResult]], rounds: int,
          duration_s: int, rows_per_call: dict[Cell, list[float]] | None = None) -> Figure:
    """`rows_per_call`: the mean rows per predict call the `oip` replica formed in each round of a cell."""
    rows_per_call = rows_per_call or {}
    figure = Figure(
        title="Serving: V2 infer requests against one scikit-learn model",
        goal=f"the stack's default path (gateway → `oip` replica) at least matches the faster of MLServer and "
             f"`mlflow models serve` in requests/s at concurrency {HEADLINE_CONCURRENCY}; aim 2×. With a second "
             f"model in the stage, the gateway answers at least {TWO_MODELS_GOAL}× the requests/s it answers with "
             "one.",
        headers=["rows/request", "concurrency", "server", "requests/s: median (min–max)", "p50 ms", "p99 ms",
                 "rows per predict call", "req/s vs fastest competitor"],
    )
    default_path = servers[0]
    verdicts = []
    against: dict[str, list[str]] = {server.label: [] for server in servers if server.compared_with is not None}
    lowest: dict[str, float] = {}
    for rows, connections in CELLS:
        measured = [server for server in servers if server.measured_at(connections)]
        throughput = {server.label: median(r.requests_per_s for r in samples[Cell(server.label, rows, connections)])
                      for server in measured}
        for server in measured:
            if server.compared_with is not None:
                versus = throughput[server.label] / throughput[server.compared_with]
                lowest[server.label] = min(versus, lowest.get(server.label, versus))
                against[server.label].append(f"{rows} row(s) at concurrency {connections}: {versus:.2f}×")
        fastest = max((server for server in measured if server.competitor), key=lambda s: throughput[s.label])
        if connections == HEADLINE_CONCURRENCY:
            versus = throughput[default_path.label] / throughput[fastest.label]
            goal = "aim met" if versus >= 2 else "goal met, aim missed" if versus >= 1 else "goal missed"
            verdicts.append(f"{rows} row(s): {versus:.2f}× {fastest.label} ({goal})")
        for server in measured:
            cell = Cell(server.label, rows, connections)
            results = samples[cell]
            figure.rows.append([
                str(rows), str(connections), server.label, spread([r.requests_per_s for r in results]),
                f"{median(r.p50_ms for r in results):.2f}", f"{median(r.p99_ms for r in results):.2f}",
                f"{median(rows_per_call[cell]):.1f}" if cell in rows_per_call else "–",
                ratio(throughput[server.label], throughput[fastest.label])])
    figure.notes = [
        f"At concurrency {HEADLINE_CONCURRENCY}, {default_path.label} against the fastest competitor: "
        + "; ".join(verdicts) + ".",
        *batching_verdicts(servers, samples),
        *(f"{server.label} against {server.compared_with}, requests/s (medians): " + "; ".join(against[server.label])
          + f". Goal (at least {TWO_MODELS_GOAL}× in every cell): "
          + ("met." if lowest[server.label] >= TWO_MODELS_GOAL else "missed.")
          for server in servers if server.compared_with is not None),
        "The gateway in front of the batching replica is the stage's gateway image, environment and limits, "
        "started beside it with its model's pool pointed at that replica: what a stage declaring the model's "
        "`batching` runs.",
        f"The gateway rows stop at concurrency {GATEWAY_IN_FLIGHT_PER_CLIENT}: the gateway admits that many "
        "requests in flight per client address and answers 429 past them, and every request here comes from one "
        "address.",
        f"Load generator: wrk 4 (Debian) with `benchmarks/post_body.lua`, one thread pinned to CPU 0 "
        f"(`taskset -c 0`), closed loop over N keep-alive connections (N = concurrency), {duration_s} s per cell, "
        f"{rounds_text(rounds)}; within a round the servers run back to back for every setting (A, B, C, D, A, B, …). "
        "Latency percentiles are wrk's, medians over the rounds.",
        f"Every server container is pinned to CPU {SERVER_CPU} (`--cpuset-cpus`) with the dev stage's serving "
        "limits (1 CPU, 512 MB), user 10001, read-only root. The gateway has the stage's own gateway limit "
        "(0.5 CPU) and shares CPU 1 with the replica.",
        f"Two models in the stage: a second stage, dev as shipped, serving {MODEL_NAME} and {REGRESSOR_NAME} with "
        f"one replica each behind one gateway, every container pinned to CPU {SERVER_CPU} like the single-model "
        f"stage's (its gateway and {MODEL_NAME} replica share the CPU; the {REGRESSOR_NAME} replica, a scaled "
        "`Ridge` on scikit-learn's diabetes data, stays idle); the same iris requests go to its gateway, in the "
        "same rounds as every other server, so its ratio to the single-model gateway row compares like with like. "
        f"The single-model stage is dev with {MODEL_NAME} alone.",
        "Requests go to each container's address on the stage's bridge network (host-local), not through "
        "docker-proxy, the same way for every server.",
        "Model: `StandardScaler` + `LogisticRegression` on iris (4 features), pickled once; the stack's replica and "
        "MLServer fetch it from the stage's MLflow registry, the `mlflow models serve` image holds the same pipeline "
        "saved with `mlflow.sklearn.save_model`. All servers answered identical predictions for 100 rows before "
        "the run.",
        "Request format: V2 (`{\"inputs\": [{\"name\", \"shape\": [N, 4], \"datatype\": \"FP64\", \"data\"}]}`) for the "
        "stack and MLServer; MLflow's scoring server does not speak V2, so it gets its own `/invocations` format "
        "with the same rows (`{\"inputs\": [[...], ...]}`).",
        "MLServer as its users run it: `mlserver start` on a folder with a model-settings.json and the model, "
        "MLServer's default settings but `parallel_workers: 0` (its default worker process dies at start under "
        "the pinned uvloop 0.23), not hardened beyond the same CPU and memory limits (`benchmarks/mlserver_stock/`); with adaptive batching, `max_batch_size` "
        f"{MAX_BATCH_SIZE} and `max_batch_time` {MAX_BATCH_TIME_MS / 1000} s in its model-settings.json. The "
        "replica with batching has MAX_BATCH_SIZE and MAX_BATCH_TIME_MS set to the same (`serving.batching`). "
        "MLServer and mlserver-sklearn are 1.7.1 from `requirements-mlserver.lock` in every MLServer row; the row "
        "behind this project's layer runs the serving image's `mlserver` target (`parallel_workers: 0`, every "
        "request checked by serving/mlserver_layer.py first) and is not counted as a competitor. "
        "`mlflow models serve` runs MLflow's default "
        "scoring server (uvicorn, 1 worker) from `benchmarks/mlflow_serve/` (mlflow-skinny, scikit-learn and "
        "pandas from its hashed lock, the same versions as the training image, built FROM the same base).",
    ]
    return figure
