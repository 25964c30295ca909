"""Prometheus for one stage: scrapes the gateway and every serving replica, evaluates the repo's rules.

Metrics (what rules, dashboards and the rollout controller may rely on):

  job="gateway"  (images/gateway/metrics.py, port GATEWAY_METRICS_PORT of the gateway, never routed)
    mlops_gateway_requests_total{slot, code}                requests answered, by pool and HTTP status
    mlops_gateway_request_duration_seconds_bucket{slot, le} time from request to response (+ _sum, _count)
  job="serving"  (images/serving/serving, port 8082 of each replica; every series also carries the target
                  labels slot, model, model_version: the pin as declared, `latest` in dev)
    oip_infer_requests_total{status}                        infer requests by HTTP status
    oip_infer_duration_seconds_bucket{le}                   infer handling time of answered requests
    oip_inferred_rows_total                                 rows predicted
    oip_model_info{name, version, sha256}                   the model actually served (version resolved)
    mlops_drift_psi{feature}                                PSI of the recent rows against the training data
    mlops_drift_window_rows                                 rows the PSI is computed over
    mlops_predictions_total{prediction}                     predictions by predicted value
    mlops_reference_prediction_share{prediction}            class balance of the training data
  recording rules (images/prometheus/rules/mlops.yml)
    mlops:gateway_requests:rate1m{slot, code, model_version}
    mlops:gateway_errors:ratio_rate1m{slot}                 share of 5xx answers at the gateway
    mlops:gateway_latency_seconds:p99_1m{slot}
    mlops:serving_requests:rate1m{slot, model_version, status}
    mlops:serving_latency_seconds:p99_1m{slot, model_version}
    mlops:drift_psi:max{slot, model, model_version, feature}
    mlops:drift_threshold                                   the stage's monitoring.drift_threshold
  alerts: InputDrift, ScrapeTargetDown, GatewayErrors
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TypedDict

import pulumi
import pulumi_docker as docker

from components.containers import container_labels, hardened_container, published
from components.images import BuildSettings, image_id
from mlops.spec import MonitoringSpec

PROMETHEUS_PORT = 9090
DATA_PATH = "/prometheus"
# The image adds the rule file it writes from DRIFT_THRESHOLD (images/prometheus/start.py).
RULE_FILES = ["/etc/prometheus/rules/*.yml"]


@dataclass(frozen=True)
class ScrapeTarget:
    job: str
    address: str
    """`host:port` on the stage network."""
    labels: dict[str, str]


class MonitoringArgs(TypedDict):
    stack: str
    spec: MonitoringSpec
    builds: BuildSettings
    network: pulumi.Input[str]
    data_volume: pulumi.Input[str]
    targets: list[ScrapeTarget]
    labels: dict[str, str]


def prometheus_config(stack: str, spec: MonitoringSpec, targets: list[ScrapeTarget]) -> dict:
    """prometheus.yml: one static config per target, so each series carries its target's labels."""
    jobs: dict[str, list[dict]] = {}
    for target in targets:
        jobs.setdefault(target.job, []).append({"targets": [target.address], "labels": target.labels})
    return {
        "global": {"scrape_interval": f"{spec.scrape_interval_s}s",
                   "evaluation_interval": f"{spec.evaluation_interval_s}s",
                   "external_labels": {"stack": stack}},
        "rule_files": RULE_FILES,
        "scrape_configs": [{"job_name": job, "static_configs": configs} for job, configs in jobs.items()],
    }


class Monitoring(pulumi.ComponentResource):
    url: pulumi.Output[str]
    host_port: pulumi.Output[int]

    def __init__(self, name: str, args: MonitoringArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("mlops:monitoring:Monitoring", name, None, opts)
        spec = args["spec"]
        stack = args["stack"]
        config = prometheus_config(stack, spec, args["targets"])
        container = hardened_container(
            f"{name}-prometheus",
            parent=self,
            name=f"{stack}-prometheus",
            image=image_id(f"{name}-image", parent=self, stack=stack, image="prometheus", source=spec.image,
                           settings=args["builds"]),
            network=args["network"],
            limits=spec.limits,
            labels=container_labels(args["labels"], "monitoring"),
            health_check=spec.health_check, health_path=(PROMETHEUS_PORT, "/-/ready"),
            envs=[
                f"PROMETHEUS_CONFIG={json.dumps(config, sort_keys=True, separators=(',', ':'))}",
                f"DRIFT_THRESHOLD={spec.drift_threshold}",
                f"RETENTION_DAYS={spec.retention_days}",
            ],
            ports=published(PROMETHEUS_PORT, spec.port),
            volumes=[docker.ContainerVolumeArgs(volume_name=args["data_volume"], container_path=DATA_PATH)],
        )
        self.host_port = container.ports.apply(lambda ports: ports[0].external)
        self.url = self.host_port.apply(lambda port: f"http://{spec.port.bind_address}:{port}")
        self.register_outputs({"url": self.url, "host_port": self.host_port})
