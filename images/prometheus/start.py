"""The Prometheus image's entrypoint: writes the stage's configuration to /tmp and runs Prometheus.

The root filesystem is read-only and Docker cannot copy files into such a container, so the Monitoring
component passes what differs per stage in the environment: PROMETHEUS_CONFIG (prometheus.yml, as JSON,
which is YAML), DRIFT_THRESHOLD (rendered here into the one recording rule the static rules in
/etc/prometheus/rules compare drift with) and RETENTION_DAYS.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

RUNTIME_DIR = Path("/tmp/prometheus")
DATA_DIR = "/prometheus"
PORT = 9090


def threshold_rules(threshold: float) -> str:
    """The stage's drift threshold as the series `mlops:drift_threshold`, so the alert rule in the repo
    stays a static file that `promtool` checks and unit-tests."""
    return json.dumps({"groups": [{"name": "mlops-stage", "rules": [
        {"record": "mlops:drift_threshold", "expr": f"vector({threshold!r})"}]}]}, indent=2) + "\n"


def main() -> None:
    try:
        config = json.loads(os.environ["PROMETHEUS_CONFIG"])
        threshold = float(os.environ["DRIFT_THRESHOLD"])
        retention_days = int(os.environ.get("RETENTION_DAYS", "15"))
    except (KeyError, ValueError) as error:
        sys.exit(f"prometheus: set PROMETHEUS_CONFIG (JSON), DRIFT_THRESHOLD (a number) and RETENTION_DAYS: {error}")
    if not math.isfinite(threshold) or threshold <= 0:
        sys.exit(f"prometheus: DRIFT_THRESHOLD must be a positive number, got {threshold}")
    RUNTIME_DIR.mkdir(parents=True, exist_ok=True)
    stage_rules = RUNTIME_DIR / "stage-rules.yml"
    stage_rules.write_text(threshold_rules(threshold))
    config["rule_files"] = [*config.get("rule_files", []), str(stage_rules)]
    (RUNTIME_DIR / "prometheus.yml").write_text(json.dumps(config, indent=2) + "\n")
    os.execv("/usr/bin/prometheus", [
        "prometheus",
        f"--config.file={RUNTIME_DIR / 'prometheus.yml'}",
        f"--storage.tsdb.path={DATA_DIR}",
        f"--storage.tsdb.retention.time={retention_days}d",
        f"--web.listen-address=0.0.0.0:{PORT}",
    ])


if __name__ == "__main__":
    main()
