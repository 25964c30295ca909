"""The `oip` runtime: this package's own V2 server under uvicorn."""
import logging
import os

import sklearn
import uvicorn
import uvloop
from prometheus_client import generate_latest

from serving.app import InferenceApp
from serving.batching import BatchingSettings
from serving.drift import DriftMonitor, ProfileError
from serving.metrics_server import MetricsServer
from serving.sampling import RequestSampler
from serving.schema import ModelSchema
from serving.startup import fetch_pinned_model, loaded_model, model_schema

PORT = 8080
# Prometheus scrapes the replica on a port of its own, inside the stage network: the gateway routes only
# the V2 API on PORT, so nobody reaches the metrics through it.
METRICS_PORT = 8082
# Longer than the gateway's upstream keepalive_timeout (60 s): the gateway, not the replica, closes idle
# connections, so nginx never sends a request on a connection the replica is closing.
KEEPALIVE_S = 75


def drift_monitor(manifest: dict | None, schema: ModelSchema) -> DriftMonitor | None:
    """Drift scoring when the stage is monitored (DRIFT_WINDOW_ROWS is set) and the model's manifest
    carries a reference profile; without one the replica serves all the same, without drift scores."""
    window_rows = os.environ.get("DRIFT_WINDOW_ROWS")
    if not window_rows:
        return None
    profile = (manifest or {}).get("reference_profile")
    if profile is None:
        logging.getLogger("serving").warning("the model's manifest has no reference_profile (trained before "
                                             "profiles were recorded?): no input drift scores")
        return None
    try:
        return DriftMonitor(profile, schema.n_features, int(window_rows), feature_names=schema.names, task=schema.task)
    except ProfileError as error:
        logging.getLogger("serving").warning("%s: no input drift scores", error)
        return None


def main() -> None:
    fetched = fetch_pinned_model("oip")
    model = loaded_model(fetched)
    schema = model_schema(fetched, model.n_features_in_)
    # The app refuses non-finite inputs itself, so the model need not check every request again.
    sklearn.set_config(assume_finite=True)
    app = InferenceApp(model, name=fetched.name, version=fetched.version, sha256=fetched.sha256, schema=schema,
                       drift=drift_monitor(fetched.manifest, schema),
                       sampler=RequestSampler.from_env(model=fetched.name, version=fetched.version),
                       batching=BatchingSettings.from_env())
    server = uvicorn.Server(uvicorn.Config(
        app, host="0.0.0.0", port=PORT, http="httptools", lifespan="off", access_log=False, server_header=False,
        date_header=False, timeout_keep_alive=KEEPALIVE_S, log_level="info"))

    async def serve() -> None:
        # On the API's event loop: the metrics port adds no thread (serving/metrics_server.py).
        await MetricsServer(lambda: generate_latest(app.metrics)).start(METRICS_PORT)
        await server.serve()

    uvloop.run(serve())


if __name__ == "__main__":
    main()
