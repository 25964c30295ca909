"""MLflow tracking servers for the tests, started as the MLflow image starts them (images/mlflow/start.py and
its auth.ini: the basic-auth app, the stage's identities, the authorization function), from an `mlflow`
executable: $MLOPS_MLFLOW_BIN, `mlflow` on PATH, or a venv built once (cached by pytest) from the hermetic
wheels of images/mlflow (`make wheels`).

A pytest plugin (tests/conftest.py loads it) so the session's two servers are started once for every
module that takes `registries`, not once per importing module.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from components.model_registry import mlflow_password_hashes
from mlops_spec.project import REPO_ROOT
from tests.conftest import free_port

MLFLOW_IMAGE = REPO_ROOT / "images" / "mlflow"
# Each server's MLflow secret (mlops:mlflowPassword of the stage it plays).
MLFLOW_SECRETS = {"source": os.urandom(12).hex(), "target": os.urandom(12).hex()}
SERVER_START_TIMEOUT_S = 180


def _mlflow_from_wheels(cache: Path) -> Path | None:
    """The mlflow of images/mlflow's lock, installed once from its downloaded wheels into a cached venv."""
    wheels = MLFLOW_IMAGE / "wheels"
    if not (wheels / "SHA256SUMS").is_file():
        return None
    lock = MLFLOW_IMAGE / "requirements.lock"
    venv = cache / "venv"
    stamp = venv / "lock.sha"
    executable = venv / "bin" / "mlflow"
    lock_sha = hashlib.sha256(lock.read_bytes()).hexdigest()
    if executable.is_file() and stamp.is_file() and stamp.read_text() == lock_sha:
        return executable
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # --no-deps as in the image: the lock leaves out flavour-only dependencies mlflow declares.
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-index", "--require-hashes", "--no-deps",
                    "--find-links", str(wheels), "-r", str(lock)], check=True)
    stamp.write_text(lock_sha)
    return executable


@pytest.fixture(scope="session")
def mlflow_executable(request) -> Path:
    configured = os.environ.get("MLOPS_MLFLOW_BIN") or shutil.which("mlflow")
    found = Path(configured) if configured else _mlflow_from_wheels(request.config.cache.mkdir("mlflow-server"))
    if found is None:
        pytest.skip("needs an MLflow server: set MLOPS_MLFLOW_BIN, put mlflow on PATH, or run `make wheels` "
                    "so the tests can install images/mlflow's locked wheels")
    return found



def start_server(executable: Path, folder: Path, secret: str, port: int | None = None) -> tuple[subprocess.Popen, int]:
    """A server on `port` (a free one by default) keeping its data in `folder`: started again on the same port
    and folder, it is the same registry back up."""
    port = port or free_port()
    folder.mkdir(parents=True, exist_ok=True)
    log = (folder / "server.log").open("a")
    auth_config = folder / "auth.ini"
    auth_config.write_text((MLFLOW_IMAGE / "auth.ini").read_text().replace("sqlite:////data/db/", f"sqlite:///{folder}/"))
    server = subprocess.Popen(
        [str(executable.parent / "python"), str(MLFLOW_IMAGE / "start.py"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{folder}/mlflow.db",
         "--artifacts-destination", str(folder / "artifacts"), "--serve-artifacts"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # Promotion needs no server-side jobs; their worker pool would only load the machine.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_AUTH_CONFIG_PATH": str(auth_config),
             "MLOPS_MLFLOW_PASSWORD_HASHES": mlflow_password_hashes(secret, folder.name), "PATH": f"{executable.parent}:{os.environ['PATH']}",
             # As the image's PYTHONPATH: the server's workers import auth.ini's authorization function from there.
             "PYTHONPATH": str(MLFLOW_IMAGE)})
    return server, port


def wait_healthy(server: subprocess.Popen, port: int, folder: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited with {server.returncode}:\n{(folder / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow server on port {port} not healthy after {SERVER_START_TIMEOUT_S}s")


@pytest.fixture(scope="session")
def registries(mlflow_executable, tmp_path_factory):
    """Ports of two running MLflow servers: the source stage's (staging) and the target's (prod)."""
    root = tmp_path_factory.mktemp("registries")
    started = [(*start_server(mlflow_executable, root / role, MLFLOW_SECRETS[role]), root / role)
               for role in ("source", "target")]
    try:
        for server, port, folder in started:
            wait_healthy(server, port, folder)
        yield {"source": started[0][1], "target": started[1][1]}
    finally:
        for server, _, _ in started:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            finally:
                # Workers that ignore SIGTERM must not outlive the tests.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(server.pid, signal.SIGKILL)
