"""Shared fixtures. Tests that need a real Docker engine take `docker_engine`."""
from __future__ import annotations

import os
import subprocess

import pytest

REQUIRE_DOCKER = os.environ.get("MLOPS_REQUIRE_DOCKER") == "1"


def _engine_answers() -> str | None:
    """None when the engine answers, else why not."""
    try:
        probe = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True,
                               text=True, timeout=20)
    except FileNotFoundError:
        return "the docker command is not installed"
    except subprocess.TimeoutExpired:
        return "the Docker engine did not answer within 20 s"
    if probe.returncode != 0:
        return f"no Docker engine answers ({probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else 'docker info failed'})"
    return None


@pytest.fixture(scope="session")
def docker_engine() -> None:
    """Skips without an engine on a user's machine; under MLOPS_REQUIRE_DOCKER=1 (CI) that is a failure."""
    reason = _engine_answers()
    if reason is None:
        return
    if REQUIRE_DOCKER:
        pytest.fail(f"MLOPS_REQUIRE_DOCKER=1 but {reason}", pytrace=False)
    pytest.skip(f"needs a Docker engine: {reason}")
