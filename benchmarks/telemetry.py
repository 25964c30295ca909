"""Figure 6: the cost of input drift scoring: requests/s of one `oip` replica with and without it, side by side.

Both replicas run the same serving image and the same model version (registered with a manifest that
carries the reference profile), as siblings of a dev stage's replica with its hardening and limits, pinned to
the same CPU; they differ only in DRIFT_WINDOW_ROWS, which a stage with `monitoring:` sets.
"""
from __future__ import annotations

import hashlib
import json
import sys
import timeit
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
from sklearn.datasets import load_iris

from benchmarks import loadgen
from benchmarks import stage as bench_stage
from benchmarks.model import MODEL_NAME, MlflowRegistry, model_bytes, sample_rows
from benchmarks.report import Figure, median, rounds_text, spread
from benchmarks.serving import SERVER_CPU, V2_INFER_PATH, container_address, container_env, start_like, v2_body
from mlops.modelstore import BasicAuth
from mlops_spec.contract import MLFLOW_PORT, TRAINER, derived_password, model_registry_name
from mlops_spec.models import MonitoringSpec
from mlops_spec.project import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "images" / "training"))
sys.path.insert(0, str(REPO_ROOT / "images" / "serving"))
from mlops_training.profile import reference_profile  # noqa: E402
from serving.drift import DriftMonitor  # noqa: E402

ROWS = (1, 100)
CONNECTIONS = 8
GOAL_LOSS = 0.10
WINDOW_ROWS = MonitoringSpec.model_fields["drift_window_rows"].default
VARIANTS = {"without drift scoring": None, f"with drift scoring (window {WINDOW_ROWS} rows)": WINDOW_ROWS}


def iris_profile() -> dict:
    dataset = load_iris()
    return reference_profile(dataset.data, [str(label) for label in dataset.target], list(dataset.feature_names),
                             "classification")


def manifest(payload: bytes) -> bytes:
    """What a training run logs next to model.pkl, as far as serving reads it."""
    return json.dumps({"outputs": {"model_sha256": hashlib.sha256(payload).hexdigest()},
                       "reference_profile": iris_profile()}).encode()


def in_process_costs_us(repeats: int = 20_000) -> dict[str, float]:
    """What drift scoring adds in the replica's process, free of the machine's load: recording one request of
    1 and of 100 rows, and one scrape of a full window; best of five, in microseconds."""
    drift = DriftMonitor(iris_profile(), 4, WINDOW_ROWS)
    costs = {}
    for rows in ROWS:
        batch, predictions = np.asarray(sample_rows(rows)), np.zeros(rows, dtype=np.int64)
        costs[f"record {rows} row(s)"] = min(timeit.repeat(lambda: drift.observe(batch, predictions),
                                                           number=repeats, repeat=5)) / repeats * 1e6
    costs["scrape"] = min(timeit.repeat(lambda: list(drift.collect()), number=200, repeat=5)) / 200 * 1e6
    return costs


@dataclass(frozen=True)
class Cell:
    load: loadgen.LoadResult
    cpu_us_per_request: float
    """CPU time the replica's container used per request: unlike requests/s, barely moved by what else the
    machine runs."""


@dataclass(frozen=True)
class Replica:
    url: str
    container: Any

    def cpu_ns(self) -> int:
        return self.container.stats(stream=False, one_shot=True)["cpu_stats"]["cpu_usage"]["total_usage"]

    def load(self, body: bytes, duration_s: int) -> Cell:
        before = self.cpu_ns()
        result = loadgen.post_load(self.url, body, CONNECTIONS, duration_s)
        used_ns = self.cpu_ns() - before
        return Cell(result, used_ns / 1000 / (result.requests_per_s * duration_s))


@contextmanager
def replicas() -> Iterator[dict[str, Replica]]:
    """A replica per variant, all of the same image and model version, pinned to SERVER_CPU."""
    payload = model_bytes()
    spec = bench_stage.dev_spec(docker_chooses_ports=True, models=(MODEL_NAME,))
    with bench_stage.deployed("telemetry", spec) as (stage, started):
        replica = started[bench_stage.first_replica(stage.stack, MODEL_NAME)]
        trainer = BasicAuth(TRAINER, derived_password(stage.mlflow_password, TRAINER))
        registry = f"http://127.0.0.1:{stage.host_port(model_registry_name(stage.stack), MLFLOW_PORT)}"
        version = MlflowRegistry(registry, trainer).register(MODEL_NAME, payload, manifest(payload))
        environment = container_env(replica) | {"MODEL_VERSION": version, "MODEL_SHA256": hashlib.sha256(payload).hexdigest()}
        variants = {}
        for index, (label, window) in enumerate(VARIANTS.items()):
            drift = {} if window is None else {"DRIFT_WINDOW_ROWS": str(window)}
            sibling = start_like(replica, f"variant-{index}", replica.image.id, {**environment, **drift})
            bench_stage.wait_ready(f"http://{container_address(sibling)}:8080/v2/health/ready", 180)
            variants[label] = Replica(f"http://{container_address(sibling)}:8080{V2_INFER_PATH}", sibling)
        replica.stop()  # off the shared CPU while the variants are measured
        yield variants


def measure(rounds: int = 9, duration_s: int = 3) -> Figure:
    with replicas() as variants:
        samples: dict[int, dict[str, list[Cell]]] = {}
        for rows in ROWS:
            body = v2_body(sample_rows(rows))
            for replica in variants.values():
                loadgen.post_load(replica.url, body, CONNECTIONS, 1)
            samples[rows] = {label: [] for label in variants}
            # A, B, then B, A: whichever runs second in a round gets no systematic advantage or penalty.
            for round_number in range(rounds):
                labels = list(variants) if round_number % 2 == 0 else list(reversed(variants))
                for label in labels:
                    samples[rows][label].append(variants[label].load(body, duration_s))
    figure = Figure(
        title="Telemetry: input drift scoring on a replica",
        goal=f"drift scoring costs under {GOAL_LOSS:.0%} of a replica's requests/s.",
        headers=["rows/request", "replica", "requests/s: median (min–max)", "p50 ms", "p99 ms",
                 "CPU µs per request: median (min–max)", "requests/s vs without", "CPU per request vs without"])
    verdicts = []
    for rows, by_variant in samples.items():
        baseline = next(iter(by_variant.values()))
        for label, cells in by_variant.items():
            # Each round's pair ran back to back, under the same load from the rest of the machine.
            throughput = median(cell.load.requests_per_s / without.load.requests_per_s
                                for cell, without in zip(cells, baseline))
            cpu = median(cell.cpu_us_per_request / without.cpu_us_per_request for cell, without in zip(cells, baseline))
            figure.rows.append([str(rows), label, spread([cell.load.requests_per_s for cell in cells]),
                                f"{median(cell.load.p50_ms for cell in cells):.2f}",
                                f"{median(cell.load.p99_ms for cell in cells):.2f}",
                                spread([cell.cpu_us_per_request for cell in cells]), f"{throughput:.2f}×", f"{cpu:.2f}×"])
        capacity = 1 / cpu - 1
        verdicts.append(f"{rows} row(s): requests/s {throughput - 1:+.1%}, capacity by CPU per request "
                        f"{capacity:+.1%} ({'goal met' if capacity > -GOAL_LOSS else 'goal missed'})")
    costs = in_process_costs_us()
    figure.notes = [
        "; ".join(verdicts) + ". Ratios are medians of each round's pair. A replica under this load is "
        "CPU-bound, so its capacity is the inverse of its CPU time per request (read from the engine's container "
        "stats before and after each cell); that holds still on a busy machine, where requests/s swings with "
        "everything else the two cores run.",
        "In the replica's process, without the machine's load: " + ", ".join(
            f"{what} {cost:.1f} µs" for what, cost in costs.items())
        + " (`DriftMonitor`, best of five); a request is recorded as an append, and rows are binned only per "
          f"scrape, so the cost per request stays near a microsecond against the {1e6 / 2500:.0f} µs or more a "
          "replica spends on a request (figure 1).",
        f"Load generator: wrk as in figure 1 (one thread pinned to CPU 0), {CONNECTIONS} keep-alive connections "
        f"straight to each replica's address on the stage network, {duration_s} s per cell, {rounds_text(rounds)}, "
        "the two replicas back to back in each round, in turns first (A, B, B, A, …).",
        f"Both replicas: the dev stage's {MODEL_NAME} serving image and limits (1 CPU, 512 MB), pinned to CPU {SERVER_CPU}, the "
        "same model version fetched from the stage's MLflow; the rows are iris rows, so the window always holds "
        "real data. Prometheus scraping (every 15 s by default, PSI computed per scrape) is not part of the load.",
        "Gateway metrics (one syslog datagram per proxied request, images/gateway/metrics.py) are on in every "
        "stage and so in figure 1's gateway numbers.",
    ]
    return figure
