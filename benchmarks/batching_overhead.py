"""What batching costs a lone client: the `oip` app driven as uvicorn drives it, on uvloop, one request at a time,
with batching off and on interleaved, so the machine's load weighs on both alike. Runs inside the serving image:

    docker build -q -t mlops-bench/serving:oip --target oip images/serving
    docker run --rm --cpuset-cpus 1 -v "$PWD/benchmarks/batching_overhead.py:/opt/serving/batching_overhead.py:ro" \\
        mlops-bench/serving:oip python batching_overhead.py
"""
import json
import time

import sklearn
import uvloop
from serving.app import InferenceApp
from serving.batching import UNBATCHED, BatchingSettings
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

REQUESTS = 3000
BODY = json.dumps({"inputs": [{"name": "input-0", "datatype": "FP64", "shape": [1, 4],
                               "data": [5.1, 3.5, 1.4, 0.2]}]}).encode()
SCOPE = {"type": "http", "method": "POST", "path": "/v2/models/iris-classifier/infer",
         "headers": [(b"content-length", str(len(BODY)).encode())]}


async def receive() -> dict:
    return {"type": "http.request", "body": BODY, "more_body": False}


async def send(message: dict) -> None:
    pass


async def one_client(apps: dict[str, InferenceApp]) -> dict[str, list[float]]:
    took: dict[str, list[float]] = {mode: [] for mode in apps}
    for _ in range(REQUESTS):
        for mode, app in apps.items():
            started = time.perf_counter()
            await app(SCOPE, receive, send)
            took[mode].append(time.perf_counter() - started)
    return took


def main() -> None:
    features, labels = load_iris(return_X_y=True)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500)).fit(features, labels)
    sklearn.set_config(assume_finite=True)
    apps = {mode: InferenceApp(model, name="iris-classifier", version="1", sha256="ab" * 32, batching=batching)
            for mode, batching in (("off", UNBATCHED),
                                   ("on (32 rows, 2 ms)", BatchingSettings(max_rows=32, max_wait_s=0.002)))}
    for mode, took in uvloop.run(one_client(apps)).items():
        took.sort()
        print(f"batching {mode}: p50 {took[len(took) // 2] * 1e6:.0f} µs, p90 {took[len(took) * 9 // 10] * 1e6:.0f} µs")


if __name__ == "__main__":
    main()
