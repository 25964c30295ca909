"""Prometheus for one stage: scrapes the gateway and every serving replica, evaluates the repo's rules.

On one host it scrapes each container by name; on a swarm it runs on the stateful node, where its time series
volume lives, pulls its image from the stage's registry by digest like the serving and gateway images, and
discovers the tasks of each service through Swarm's DNS (`tasks.<service>`, A records, resolved again every
scrape interval), so a task Swarm moves to another node or adds is scraped from then on and one that is gone
stops being a target. The image, rules, configuration, metrics and labels are the same.

Metrics (what rules, dashboards and the rollout controller may rely on):

  job="gateway"  (images/gateway/metrics.py, port GATEWAY_METRICS_PORT of the gateway, never routed; on a
                  swarm one target per edge node, which the rules sum over; the target carries no labels, so
                  the gateway's own `model` stays as it is)
    mlops_gateway_requests_total{model, slot, code}         requests proxied, by model, pool and HTTP status
    mlops_gateway_request_duration_seconds_bucket{model, slot, le}
                                                            time from request to response (+ _sum, _count)
  job="serving"  (images/serving/serving, port 8082 of each replica; every series also carries the target
                  labels slot, model, model_version: the pin as declared, `latest` in dev. The model's name
                  comes from these, not from the replica, whose own `model` label Prometheus would rename)
    oip_infer_requests_total{status}                        infer requests by HTTP status
    oip_infer_duration_seconds_bucket{le}                   infer handling time of answered requests
    oip_inferred_rows_total                                 rows predicted
    oip_model_info{name, version, sha256}                   the model actually served (version resolved)
    mlops_drift_psi{feature}                                PSI of the recent rows against the training data
                                                            (feature: the schema's name; a number without schema)
    mlops_drift_window_rows                                 rows the PSI is computed over
    mlops_predictions_total{prediction}                     a classifier's predictions by class; a regressor's by
                                                            fixed bin of the training targets ("[87.0,120.5)")
    mlops_reference_prediction_share{prediction}            the same classes' (bins') shares of the training labels
  recording rules (images/prometheus/rules/mlops.yml)
    mlops:gateway_requests:rate1m{model, slot, code, model_version}
    mlops:gateway_errors:ratio_rate1m{model, slot}          share of 5xx answers at the gateway
    mlops:gateway_latency_seconds:p99_1m{model, slot}
    mlops:serving_requests:rate1m{slot, model, model_version, status}
    mlops:serving_latency_seconds:p99_1m{slot, model, model_version}
    mlops:drift_psi:max{slot, model, model_version, feature}
    mlops:drift_threshold                                   the stage's monitoring.drift_threshold
  alerts: InputDrift, ScrapeTargetDown, GatewayErrors
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TypedDict

import pulumi

from components.runtimes import ComponentType, Runtime
from components.workload import HttpHealth, Publish, Role, VolumeMount, Workload
from mlops_spec.contract import PROMETHEUS_DATA_DIR, PROMETHEUS_PORT, PrometheusEnv, prometheus_name
from mlops_spec.models import ModelPin, MonitoringSpec

TYPE = ComponentType(single_host="mlops:monitoring:Monitoring", swarm="mlops:swarm_monitoring:SwarmMonitoring")
# The image adds the rule file it writes from DRIFT_THRESHOLD (images/prometheus/start.py).
RULE_FILES = ["/etc/prometheus/rules/*.yml"]


@dataclass(frozen=True)
class ScrapeTarget:
    job: str
    address: str
    """`host:port` on the stage network; with `every_task`, `host` is Swarm's `tasks.<service>`."""
    labels: dict[str, str]
    every_task: bool = False
    """Scrape every address the host name resolves to (A records), resolved again every scrape interval: the
    tasks a Swarm service runs now, wherever they were scheduled."""


def replica_labels(slot: str, pin: ModelPin) -> dict[str, str]:
    """The target labels of a serving replica, which the rules, `mlops status`, `mlops drift` and the rollout
    controller select on."""
    return {"slot": slot, "model": pin.name, "model_version": str(pin.version)}


class MonitoringArgs(TypedDict):
    runtime: Runtime
    spec: MonitoringSpec
    data_volume: pulumi.Input[str]
    targets: list[ScrapeTarget]


def scrape_config(job: str, targets: list[ScrapeTarget], refresh_s: int) -> dict:
    """One job: a static config per fixed target, so each series carries its target's labels; names that stand
    for every task of a service as DNS discovery, whose configs take no labels, so the targets each name
    yields get theirs by relabelling on the name (`__meta_dns_name`)."""
    config: dict = {"job_name": job}
    fixed = [target for target in targets if not target.every_task]
    discovered = [target for target in targets if target.every_task]
    if fixed:
        config["static_configs"] = [{"targets": [target.address], "labels": target.labels} for target in fixed]
    if discovered:
        names = [target.address.rpartition(":") for target in discovered]
        config["dns_sd_configs"] = [{"names": [host], "type": "A", "port": int(port), "refresh_interval": f"{refresh_s}s"}
                                    for host, _, port in names]
        relabelling = [
            {"source_labels": ["__meta_dns_name"], "regex": re.escape(host), "target_label": key, "replacement": value}
            for (host, _, _), target in zip(names, discovered) for key, value in sorted(target.labels.items())]
        if relabelling:
            config["relabel_configs"] = relabelling
    return config


def prometheus_config(stack: str, spec: MonitoringSpec, targets: list[ScrapeTarget]) -> dict:
    """prometheus.yml: one scrape config per job, every series carrying its target's labels."""
    jobs = dict.fromkeys(target.job for target in targets)
    return {
        "global": {"scrape_interval": f"{spec.scrape_interval_s}s",
                   "evaluation_interval": f"{spec.evaluation_interval_s}s",
                   "external_labels": {"stack": stack}},
        "rule_files": RULE_FILES,
        "scrape_configs": [scrape_config(job, [target for target in targets if target.job == job],
                                         spec.scrape_interval_s) for job in jobs],
    }


def prometheus_settings(stack: str, spec: MonitoringSpec, targets: list[ScrapeTarget]) -> dict[str, str]:
    """What the Prometheus image is given (images/prometheus/start.py), on one host and on a swarm alike."""
    config = prometheus_config(stack, spec, targets)
    return {PrometheusEnv.CONFIG: json.dumps(config, sort_keys=True, separators=(",", ":")),
            PrometheusEnv.DRIFT_THRESHOLD: str(spec.drift_threshold),
            PrometheusEnv.RETENTION_DAYS: str(spec.retention_days)}


class Monitoring(pulumi.ComponentResource):
    url: pulumi.Output[str]

    def __init__(self, name: str, args: MonitoringArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        runtime = args["runtime"]
        super().__init__(runtime.type_token(TYPE), name, None, opts)
        spec = args["spec"]
        stack = runtime.stack
        publish = Publish(PROMETHEUS_PORT, spec.port)
        prometheus = runtime.deploy(Workload(
            resource_name=f"{name}-prometheus",
            name=prometheus_name(stack),
            component="monitoring",
            image=runtime.image(f"{name}-image", parent=self, image="prometheus", source=spec.image).runs,
            limits=spec.limits,
            health=HttpHealth(PROMETHEUS_PORT, "/-/ready", spec.health_check),
            # One TSDB on one volume, which Prometheus locks.
            role=Role.STATEFUL,
            env=prometheus_settings(stack, spec, args["targets"]),
            publish=publish,
            volumes=[VolumeMount(args["data_volume"], PROMETHEUS_DATA_DIR)],
        ), parent=self)
        self.url = runtime.endpoint(prometheus, publish)
        self.register_outputs({"url": self.url})
