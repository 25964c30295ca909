"""Serving on a Docker Swarm: blue (and green) as replicated services spread over the nodes, behind a gateway
on every edge node that splits traffic and resolves the tasks through Swarm's DNS.

Contract with the cluster (what the nodes need; the cluster tests and docs/hosts-and-clusters.md rely on it):
- `docker.url` reaches a manager, and that manager is the node labelled `<swarm.stateful_label>=true`: MLflow,
  the registry and the artifact volumes live there, and the platform images are built there and run by ID.
- Nodes labelled `<swarm.edge_label>=true` run one gateway each (global mode), published in host mode on
  `serving.port.host_port`; point clients or a load balancer at them.
- Every node lists `swarm.registry_address` (the stateful node's address and image_registry.port.host_port)
  in its engine's `insecure-registries`: workload and gateway images are pushed there by digest and pulled
  from there, with the provider's registry credentials passed along by Swarm (never in a task's env).
- Services: `<stack>-model-registry`, `<stack>-image-registry` (one task each, stop-first),
  `<stack>-serving-blue` and `<stack>-serving-green` (`serving.replicas` tasks each, start-first, endpoint
  mode dnsrr, reachable as `tasks.<service>:8080`), `<stack>-gateway` (global on edge nodes, stop-first:
  its host port cannot be held twice on a node), and with `monitoring:` `<stack>-prometheus`
  (components/swarm_monitoring.py), which scrapes `tasks.<service>` of each slot and of the gateway. All on
  the attachable overlay network `<stack>-net`.
- Secrets: `<stack>-mlflow-<hash>`, `<stack>-registry-<hash>`, `<stack>-mlflow-reader-<hash>`, mounted under
  /run/secrets and read through `*_FILE` variables; the hash changes with the content.
- Rolling updates: one task at a time, start-first, monitored for (retries + 1) x (interval + timeout) of the
  health check, `failure_action: rollback` with `max_failure_ratio: 0`.
"""
from __future__ import annotations

from typing import Optional, TypedDict

import pulumi

from components.images import BuildSettings, PushTarget, pullable_image
from components.model_serving import (
    GATEWAY_METRICS_PORT,
    GATEWAY_PORT,
    REPLICA_METRICS_PORT,
    SERVING_PORT,
    batching_settings,
    model_labels,
    model_settings,
)
from components.monitoring import ScrapeTarget, replica_labels
from components.services import hardened_service, secret_file, swarm_secret
from mlops_spec.models import ImageSource, ModelPin, Release, ServingSpec, SwarmSpec

READER_SECRET_FILE = "mlflow-reader-password"
REPLICA_TMP_BYTES = 256 * 1024 * 1024  # as on one host: room for the fetched model


class SwarmServingArgs(TypedDict):
    stack: str
    spec: ServingSpec
    swarm: SwarmSpec
    release: Release
    builds: BuildSettings
    registry_url: pulumi.Input[str]
    reader_password: pulumi.Input[str]
    network_id: pulumi.Input[str]
    push: PushTarget
    depends_on: list[pulumi.Resource]
    labels: dict[str, str]
    identity: dict[str, str]
    """Labels that never change for the life of a service (stack.identity_labels)."""
    published_host: str
    drift_window_rows: Optional[int]
    """Rows each replica scores input drift over, when the stage is monitored; None: no drift scoring."""


class SwarmServing(pulumi.ComponentResource):
    endpoint: pulumi.Output[str]
    serving_image_digest: pulumi.Output[str]
    scrape_targets: list[ScrapeTarget]
    """Every task of each slot and every gateway, by the names Swarm's DNS resolves to the tasks that run now."""

    def __init__(self, name: str, args: SwarmServingArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("mlops:swarm_serving:SwarmServing", name, None, opts)
        spec = args["spec"]
        swarm = args["swarm"]
        stack = args["stack"]
        release = args["release"]
        images = {"parent": self, "stack": stack, "settings": args["builds"], "push": args["push"],
                  "push_after": args["depends_on"]}
        blue_source = ImageSource(build=spec.build) if spec.build is not None else release.images.serving
        blue_image = pullable_image(f"{name}-image", image="serving", source=blue_source, target=spec.runtime, **images)
        slots: dict[str, tuple[ModelPin, pulumi.Input[str]]] = {"blue": (release.model, blue_image)}
        if spec.green is not None:
            slots["green"] = (spec.green.model, blue_image if spec.green.serving_image is None else spec.green.serving_image)

        reader = swarm_secret(f"{name}-reader-secret", parent=self, stack=stack, purpose="mlflow-reader",
                              value=args["reader_password"])
        upstreams: dict[str, str] = {}
        self.scrape_targets = []
        drift_env = {} if args["drift_window_rows"] is None else {"DRIFT_WINDOW_ROWS": str(args["drift_window_rows"])}
        replicas = []
        for slot, (pin, image) in slots.items():
            service_name = f"{stack}-serving-{slot}"
            replicas.append(hardened_service(
                f"{name}-{slot}",
                parent=self,
                name=service_name,
                image=image,
                network_id=args["network_id"],
                limits=spec.limits, reservations=swarm.reservations,
                labels={**args["labels"], **model_labels(pin), "mlops.slot": slot},
                identity={**args["identity"], "mlops.slot": slot}, component="model-serving",
                health_check=spec.health_check, health_path=(SERVING_PORT, "/v2/health/ready"),
                replicas=spec.replicas, order="start-first",
                # A replica that follows `latest` (dev) has nothing to serve before the first training run.
                converge=pin.is_pinned,
                constraints=swarm.constraints, spread_over=swarm.spread_over,
                env={**model_settings(pin, args["registry_url"], spec.runtime),
                     "MLFLOW_TRACKING_PASSWORD_FILE": f"/run/secrets/{READER_SECRET_FILE}", **drift_env,
                     **batching_settings(spec.batching)},
                secrets=[secret_file(reader, READER_SECRET_FILE)],
                tmp_bytes=REPLICA_TMP_BYTES,
            ))
            upstreams[slot] = f"tasks.{service_name}:{SERVING_PORT}"
            self.scrape_targets.append(ScrapeTarget("serving", f"tasks.{service_name}:{REPLICA_METRICS_PORT}",
                                                    replica_labels(slot, pin), every_task=True))

        hardened_service(
            f"{name}-gateway",
            parent=self,
            name=f"{stack}-gateway",
            image=pullable_image(f"{name}-gateway-image", image="gateway", source=spec.gateway.image, **images),
            network_id=args["network_id"],
            limits=spec.gateway.limits, reservations=spec.gateway.limits,
            labels=args["labels"], identity=args["identity"], component="serving-gateway",
            health_check=spec.health_check, health_path=(GATEWAY_PORT, "/gateway/health"),
            replicas=None, order="stop-first", converge=False,
            constraints=[f"node.labels.{swarm.edge_label} == true"],
            env={"UPSTREAM_BLUE": upstreams["blue"], "UPSTREAM_GREEN": upstreams.get("green", ""),
                 "WEIGHT_BLUE": str(spec.traffic.blue), "WEIGHT_GREEN": str(spec.traffic.green)},
            published=(GATEWAY_PORT, spec.port.host_port),
            depends_on=replicas,
        )
        self.scrape_targets.append(ScrapeTarget("gateway", f"tasks.{stack}-gateway:{GATEWAY_METRICS_PORT}", {},
                                                every_task=True))
        # Every edge node answers on the port; this names the manager's, as mlops reaches the stage there.
        self.endpoint = pulumi.Output.from_input(f"http://{args['published_host']}:{spec.port.host_port}")
        self.serving_image_digest = pulumi.Output.from_input(blue_image)
        self.register_outputs({"endpoint": self.endpoint, "serving_image_digest": self.serving_image_digest})
