"""Closed-loop HTTP load with wrk (Debian's `wrk`), pinned to one CPU so the servers keep the other."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

SCRIPT = Path(__file__).with_name("post_body.lua")
LOAD_CPU = "0"


@dataclass(frozen=True)
class LoadResult:
    requests_per_s: float
    p50_ms: float
    p99_ms: float


class LoadFailed(RuntimeError):
    """The server answered errors or dropped connections: its numbers would not mean what the table says."""


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def post_load(url: str, body: bytes, connections: int, duration_s: int, cpu: str = LOAD_CPU,
              headers: Mapping[str, str] = MappingProxyType({})) -> LoadResult:
    """POST `body` to `url` over `connections` keep-alive connections, one wrk thread, for `duration_s`; a JSON
    body unless `headers` say otherwise."""
    with tempfile.NamedTemporaryFile(suffix=".json") as body_file:
        body_file.write(body)
        body_file.flush()
        command = ["taskset", "-c", cpu, "wrk", "--threads", "1", "--connections", str(connections),
                   "--duration", f"{duration_s}s", "--timeout", "10s", "--script", str(SCRIPT), url]
        finished = subprocess.run(command, capture_output=True, text=True,
                                  env={**os.environ, "WRK_BODY_FILE": body_file.name,
                                       "WRK_HEADERS": "\n".join(f"{name}: {value}" for name, value in headers.items())})
    if finished.returncode != 0:
        raise LoadFailed(f"wrk against {url} failed: {finished.stderr.strip() or finished.stdout.strip()}")
    summary = json.loads(finished.stdout.strip().splitlines()[-1])
    failures = {kind: count for kind, count in summary["errors"].items() if count}
    if failures or not summary["requests"]:
        raise LoadFailed(f"{url} with {connections} connection(s): {summary['requests']} requests, errors {failures}")
    return LoadResult(requests_per_s=summary["requests"] / (summary["duration_us"] / 1e6),
                      p50_ms=summary["p50_us"] / 1000, p99_ms=summary["p99_us"] / 1000)
