"""The `mlserver` runtime: fetch and verify the pinned model, lay out an MLServer model repository in
/tmp (the only writable path), then replace this process with `mlserver start`."""
from __future__ import annotations

import json
import os
from pathlib import Path

from serving.startup import fetch_pinned_model

REPOSITORY = Path("/tmp/mlserver")
SERVER_SETTINGS = {
    "http_port": 8080,
    # gRPC and metrics stay inside the container network; nothing publishes them.
    "grpc_port": 8081,
    "metrics_port": 8082,
    "metrics_dir": str(REPOSITORY / ".metrics"),
    "environments_dir": str(REPOSITORY / ".envs"),
    # Inference in the server process: under a one-CPU limit a separate worker process only adds a hop.
    "parallel_workers": 0,
    "debug": False,
}


def write_repository(repository: Path, name: str, version: str, payload: bytes) -> None:
    model_dir = repository / name
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "model.pkl").write_bytes(payload)
    (model_dir / "model-settings.json").write_text(json.dumps({
        "name": name,
        "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.pkl", "version": version},
    }))
    (repository / "settings.json").write_text(json.dumps(SERVER_SETTINGS))


def main() -> None:
    fetched = fetch_pinned_model("mlserver")
    write_repository(REPOSITORY, fetched.name, fetched.version, fetched.payload)
    os.chdir(REPOSITORY)
    os.execvp("mlserver", ["mlserver", "start", str(REPOSITORY)])


if __name__ == "__main__":
    main()
