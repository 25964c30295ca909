"""Prometheus of a swarm stage as a Swarm service on the stateful node, where its time series volume lives.

It is the single-host Prometheus (components/monitoring.py: same image, rules, configuration, limits and
health check) with targets found through Swarm's DNS instead of container names: every task of
`<stack>-serving-<slot>` and of `<stack>-gateway` on the overlay network, resolved again every scrape
interval, so a task Swarm moves to another node or adds is scraped from then on and one that is gone stops
being a target. Its image is pushed to the stage's registry and pulled by digest like the serving and gateway
images. Published in host mode on the stateful node at `monitoring.port.host_port`.
"""
from __future__ import annotations

from typing import TypedDict

import pulumi

from components.images import BuildSettings, PushTarget, pullable_image
from components.monitoring import DATA_PATH, PROMETHEUS_PORT, ScrapeTarget, prometheus_settings
from components.services import hardened_service
from mlops_spec.models import MonitoringSpec, SwarmSpec


class SwarmMonitoringArgs(TypedDict):
    stack: str
    spec: MonitoringSpec
    swarm: SwarmSpec
    builds: BuildSettings
    network_id: pulumi.Input[str]
    data_volume: pulumi.Input[str]
    targets: list[ScrapeTarget]
    push: PushTarget
    depends_on: list[pulumi.Resource]
    """What the image push waits for: the stage's registry."""
    labels: dict[str, str]
    identity: dict[str, str]
    """Labels that never change for the life of a service (stack.identity_labels)."""
    published_host: str


class SwarmMonitoring(pulumi.ComponentResource):
    url: pulumi.Output[str]

    def __init__(self, name: str, args: SwarmMonitoringArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("mlops:swarm_monitoring:SwarmMonitoring", name, None, opts)
        spec = args["spec"]
        stack = args["stack"]
        hardened_service(
            f"{name}-prometheus",
            parent=self,
            name=f"{stack}-prometheus",
            image=pullable_image(f"{name}-image", parent=self, stack=stack, image="prometheus", source=spec.image,
                                 settings=args["builds"], push=args["push"], push_after=args["depends_on"]),
            network_id=args["network_id"],
            limits=spec.limits, reservations=spec.limits,
            labels=args["labels"], identity=args["identity"], component="monitoring",
            health_check=spec.health_check, health_path=(PROMETHEUS_PORT, "/-/ready"),
            # One TSDB on one volume, which Prometheus locks: the old task stops before the new one opens it.
            replicas=1, order="stop-first", converge=True,
            constraints=[f"node.labels.{args['swarm'].stateful_label} == true"],
            env=prometheus_settings(stack, spec, args["targets"]),
            published=(PROMETHEUS_PORT, spec.port.host_port),
            volumes={DATA_PATH: args["data_volume"]},
        )
        self.url = pulumi.Output.from_input(f"http://{args['published_host']}:{spec.port.host_port}")
        self.register_outputs({"url": self.url})
