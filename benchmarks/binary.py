"""Figure 5: requests/s of V2 infer requests through the gateway to an `oip` replica, the same rows sent
as JSON and with the binary tensor data extension, as NVIDIA's tritonclient builds each."""
from __future__ import annotations

import functools
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import tritonclient.http as triton

from benchmarks import loadgen
from benchmarks import stage as bench_stage
from benchmarks.model import MODEL_NAME, sample_rows
from benchmarks.report import Figure, alternate, median, number, rounds_text, spread
from benchmarks.serving import SERVER_CPU, V2_INFER_PATH, container_address
from mlops_spec.contract import gateway_name

ROWS = (100, 10_000)
# The gateway lets one client address have 4 bodies of 100 kB or more in flight (nginx.conf.template), and
# every request here comes from this one address; 10,000 rows are 320 kB in binary, 160 kB as JSON.
CONNECTIONS = 4


@dataclass(frozen=True)
class Variant:
    label: str
    body: bytes
    headers: dict[str, str]


def variants(rows: int) -> list[Variant]:
    """The bytes tritonclient's HTTP client sends for `rows` FP64 rows: its default (binary in and out) and
    its JSON mode (`binary_data=False` for the input and the output)."""
    features = np.asarray(sample_rows(rows), dtype=np.float64)
    built = []
    for label, binary in (("binary", True), ("JSON", False)):
        tensor = triton.InferInput("input-0", list(features.shape), "FP64")
        tensor.set_data_from_numpy(features, binary_data=binary)
        outputs = None if binary else [triton.InferRequestedOutput("predict", binary_data=False)]
        body, json_size = triton.InferenceServerClient.generate_request_body([tensor], outputs=outputs)
        headers = ({"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(json_size)}
                   if json_size is not None else {})
        built.append(Variant(label, body, headers))
    return built


@contextmanager
def gateway_of_a_dev_stage() -> Iterator[str]:
    """dev serving iris alone (MLflow, one `oip` replica, its gateway) pinned to SERVER_CPU; the gateway's infer
    URL."""
    spec = bench_stage.dev_spec(docker_chooses_ports=True, models=(MODEL_NAME,))
    with bench_stage.deployed("binary", spec, cpus=SERVER_CPU) as (stage, started):
        yield f"http://{container_address(started[gateway_name(stage.stack)])}:8080{V2_INFER_PATH}"


def check_same_predictions(url: str, bodies: dict[int, list[Variant]]) -> None:
    for rows, built in bodies.items():
        answers = []
        for variant in built:
            request = urllib.request.Request(url, data=variant.body, headers=variant.headers or
                                             {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as response:
                header_length = response.headers.get("Inference-Header-Content-Length")
                result = triton.InferResult.from_response_body(
                    response.read(), header_length=None if header_length is None else int(header_length))
            answers.append(result.as_numpy("predict").tolist())
        if any(answer != answers[0] for answer in answers) or len(answers[0]) != rows:
            raise RuntimeError(f"binary and JSON requests of {rows} rows answered different predictions")


def measure(rounds: int = 3, duration_s: int = 5, warmup_s: int = 1) -> Figure:
    bodies = {rows: variants(rows) for rows in ROWS}
    with gateway_of_a_dev_stage() as url:
        check_same_predictions(url, bodies)
        for built in bodies.values():
            for variant in built:
                loadgen.post_load(url, variant.body, CONNECTIONS, warmup_s, headers=variant.headers)
        samples = alternate({(rows, variant.label): functools.partial(
            loadgen.post_load, url, variant.body, CONNECTIONS, duration_s, headers=variant.headers)
            for rows, built in bodies.items() for variant in built}, rounds)
    return table(bodies, samples, rounds, duration_s)


def table(bodies: dict[int, list[Variant]], samples: dict[tuple[int, str], list[loadgen.LoadResult]], rounds: int,
          duration_s: int) -> Figure:
    figure = Figure(
        title="Binary tensor data against JSON through the gateway",
        goal="the binary extension answers at least as many requests/s as JSON at 100 rows, and more at 10,000.",
        headers=["rows/request", "request format", "body bytes", "requests/s: median (min–max)", "rows/s (median)",
                 "p50 ms", "p99 ms", "req/s vs JSON"],
    )
    verdicts = []
    for rows, built in bodies.items():
        throughput = {variant.label: median(r.requests_per_s for r in samples[rows, variant.label]) for variant in built}
        for variant in built:
            results = samples[rows, variant.label]
            figure.rows.append([
                f"{rows:,}", variant.label, f"{len(variant.body):,}", spread([r.requests_per_s for r in results]),
                number(throughput[variant.label] * rows), f"{median(r.p50_ms for r in results):.2f}",
                f"{median(r.p99_ms for r in results):.2f}", f"{throughput[variant.label] / throughput['JSON']:.2f}×"])
        verdicts.append(f"{rows:,} rows: binary {throughput['binary'] / throughput['JSON']:.2f}× JSON")
    figure.notes = [
        "; ".join(verdicts) + ".",
        "Bodies: what tritonclient 2.73.0's HTTP client sends (`InferenceServerClient.generate_request_body`), built "
        "once per setting: binary is its default (`set_data_from_numpy(x)`, no output named, so it asks for every "
        "output binary: `Inference-Header-Content-Length`, raw little-endian FP64 in, raw INT64 out); JSON is its "
        "`binary_data=False` mode for the input and the output. Rows are iris rows, FP64; both formats answered "
        "identical predictions before the run.",
        f"Load generator: wrk 4 (Debian) with `benchmarks/post_body.lua` (which sends the binary bytes as they are, "
        f"with their two headers), one thread pinned to CPU 0, closed loop over {CONNECTIONS} keep-alive connections, "
        f"{duration_s} s per cell, {rounds_text(rounds)}; within a round the four cells run back to back "
        "(100 binary, 100 JSON, 10,000 binary, 10,000 JSON). Latency percentiles are wrk's, medians over the rounds.",
        f"{CONNECTIONS} connections: the gateway lets one client address have 4 bodies of 100 kB or more in flight, "
        "and every request here comes from the one address of this machine on the stage network.",
        f"The dev stage serving {MODEL_NAME} alone (created by `tests/engine.py` from the dev rendering), every "
        f"container pinned to CPU {SERVER_CPU}: the gateway (0.5 CPU, 128 MB) and one `oip` replica (1 CPU, 512 MB) "
        "sharing it; "
        "requests go to the gateway's address on the stage's bridge network.",
    ]
    return figure
