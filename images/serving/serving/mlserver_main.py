"""The `mlserver` runtime: fetch and verify the pinned model, lay out an MLServer model repository in
/tmp (the only writable path), then run MLServer in this process behind serving.mlserver_layer."""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from mlserver import MLServer
from mlserver.cli.serve import load_settings
from mlserver.logging import configure_logger
from mlserver.utils import install_uvloop_event_loop

from serving.batching import BatchingSettings
from serving.mlserver_layer import ConformanceLayer
from serving.mlserver_skops import TRUSTED_TYPES
from serving.registry import FetchedModel
from serving.startup import fetch_pinned_model, loaded_model, model_schema

REPOSITORY = Path("/tmp/mlserver")
SERVER_SETTINGS = {
    "http_port": 8080,
    # Metrics stay inside the stage network: nothing publishes them, and the gateway routes only the V2 API.
    "metrics_port": 8082,
    "metrics_dir": str(REPOSITORY / ".metrics"),
    "environments_dir": str(REPOSITORY / ".envs"),
    # Inference in the server process: under a one-CPU limit a separate worker process only adds a hop.
    "parallel_workers": 0,
    "debug": False,
}


def write_repository(repository: Path, fetched: FetchedModel, batching: BatchingSettings) -> None:
    """The model's folder: model.skops for serving.mlserver_skops where the model has that form, else model.pkl for
    MLServer's own scikit-learn runtime, which unpickles it."""
    model_dir = repository / fetched.name
    model_dir.mkdir(parents=True, exist_ok=True)
    if fetched.skops_trusted_types is None:
        file, implementation, extra = "model.pkl", "mlserver_sklearn.SKLearnModel", {}
    else:
        file, implementation = "model.skops", "serving.mlserver_skops.SkopsModel"
        extra = {"extra": {TRUSTED_TYPES: list(fetched.skops_trusted_types)}}
    (model_dir / file).write_bytes(fetched.payload)
    (model_dir / "model-settings.json").write_text(json.dumps({
        "name": fetched.name,
        "implementation": implementation,
        "parameters": {"uri": f"./{file}", "version": fetched.version, **extra},
        **adaptive_batching(batching),
    }))
    (repository / "settings.json").write_text(json.dumps(SERVER_SETTINGS))


def adaptive_batching(batching: BatchingSettings) -> dict[str, Any]:
    """The stage's batching as MLServer's own adaptive batching: unlike `oip`, MLServer counts requests, not rows,
    and waits `max_batch_time` for company whenever a batch is not full, a lone request too."""
    if not batching.batches:
        return {}
    return {"max_batch_size": batching.max_rows, "max_batch_time": batching.max_wait_s}


class NoGrpcServer:
    """Stands in for MLServer's gRPC server, which would serve infer and the model repository API (unload
    included) to anything on the stage network, past the layer; MLServer 1.7.1 has no setting to turn it off."""

    async def start(self) -> None:
        pass

    async def stop(self, sig: int | None = None) -> None:
        pass


async def serve(layer_for: Any) -> None:
    """What `mlserver start` does, with MLServer's REST app wrapped by `layer_for(app)` and no gRPC server."""
    settings, models = await load_settings(str(REPOSITORY))
    server = MLServer(settings)
    # MLServer 1.7.1 builds its servers in MLServer.__init__, and RESTServer serves whatever `_app` holds at start.
    rest = server._rest_server
    rest._app = layer_for(rest._app)
    server._grpc_server = NoGrpcServer()
    await server.start(models)


def main() -> None:
    fetched = fetch_pinned_model("mlserver")
    # The layer needs the schema (for the test prediction, to check requests and for the metadata) and the classes
    # (for the metadata); a skops form with types its manifest does not list exits here, before MLServer starts.
    model = loaded_model(fetched)
    batching = BatchingSettings.from_env()
    write_repository(REPOSITORY, fetched, batching)
    schema = model_schema(fetched, model.n_features_in_)
    os.chdir(REPOSITORY)
    configure_logger()
    install_uvloop_event_loop()
    asyncio.run(serve(lambda app: ConformanceLayer(app, name=fetched.name, version=fetched.version,
                                                   schema=schema,
                                                   classes=getattr(model, "classes_", None),
                                                   batched=batching.batches)))


if __name__ == "__main__":
    main()
