"""The machine a run measured: CPU model, cores, memory, kernel and Docker versions."""
from __future__ import annotations

import os
import platform
import subprocess


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory_gib() -> float:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    return 0.0


def _docker_versions() -> str:
    probe = subprocess.run(["docker", "version", "--format", "engine {{.Server.Version}}, client {{.Client.Version}}"],
                           capture_output=True, text=True)
    return probe.stdout.strip() if probe.returncode == 0 else f"unavailable ({probe.stderr.strip()})"


def describe() -> list[tuple[str, str]]:
    return [
        ("CPU", _cpu_model()),
        ("cores", f"{os.cpu_count()} online"),
        ("memory", f"{_memory_gib():.1f} GiB"),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("Docker", _docker_versions()),
        ("Python", platform.python_version()),
    ]
