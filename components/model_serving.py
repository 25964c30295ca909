"""Serving: each model's replicas, blue and green, behind one gateway that routes `/v2/models/<name>/` to that
model's pools and splits its traffic between its blue and green by the model's own weights.

With a model's `sampling`, each of its replicas also appends the declared share of its infer rows, with their predictions,
to a file of its own on the artifact store's samples volume (at most `max_mb` each), the next training data to
label (`mlops data samples`); never unless declared.

On a Docker Swarm, blue (and green) are replicated services spread over the nodes, behind a gateway on every
edge node that resolves the tasks through Swarm's DNS. Contract with the cluster (what the nodes need; the
cluster tests and docs rely on it):
- `docker.url` reaches a manager, and that manager is the node labelled `<swarm.stateful_label>=true`: MLflow,
  the registry and the artifact volumes live there, and the platform images are built there and run by ID.
- Nodes labelled `<swarm.edge_label>=true` run one gateway each (global mode), published in host mode on
  `serving.port.host_port`; point clients or a load balancer at them.
- Every node lists `swarm.registry_address` (the stateful node's address and image_registry.port.host_port)
  in its engine's `insecure-registries`: workload and gateway images are pushed there by digest and pulled
  from there, with the provider's registry credentials passed along by Swarm (never in a task's env).
- Services: `<stack>-model-registry`, `<stack>-image-registry` (one task each, stop-first),
  `<stack>-<model>-blue` and `<stack>-<model>-green` for each model (its replicas' count of tasks each,
  start-first, endpoint mode dnsrr, reachable as `tasks.<service>:8080`), `<stack>-gateway` (global on edge nodes, stop-first:
  its host port cannot be held twice on a node), and with `monitoring:` `<stack>-prometheus`
  (components/monitoring.py), which scrapes `tasks.<service>` of each slot and of the gateway. All on
  the attachable overlay network `<stack>-net`.
- Secrets: `<stack>-mlflow-<hash>`, `<stack>-registry-<hash>`, `<stack>-mlflow-reader-<hash>`, mounted under
  /run/secrets and read through `*_FILE` variables; the hash changes with the content.
- Rolling updates: one task at a time, start-first, monitored for (retries + 1) x (interval + timeout) of the
  health check, `failure_action: rollback` with `max_failure_ratio: 0`; the rollback itself runs to the end
  (`failure_action: continue`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, TypedDict

import pulumi

from components.monitoring import ScrapeTarget, replica_labels
from components.runtimes import ComponentType, Runtime
from components.workload import EnvValue, HttpHealth, Publish, Role, SecretEnv, VolumeMount, Workload
from mlops_spec.contract import (
    GATEWAY_METRICS_PORT,
    GATEWAY_PORT,
    READER,
    ROLLOUT_DIR,
    SAMPLES_DIR,
    SERVING_METRICS_PORT,
    SERVING_PORT,
    GatewayRoute,
    ReplicaEnv,
    TrackingEnv,
    gateway_env,
    gateway_name,
    serving_name,
)
from mlops_spec.models import BatchingSpec, ImageSource, ModelPin, SamplingSpec, ServedModel, ServingSpec

REPLICA_TMP_MB = 256  # room for the fetched model
TYPE = ComponentType(single_host="mlops:model_serving:ModelServing", swarm="mlops:swarm_serving:SwarmServing")


@dataclass(frozen=True)
class RolloutWiring:
    prometheus_url: str
    """The stage's Prometheus as the gateway reaches it on the stage network."""
    scrape_interval_s: int
    log_volume: pulumi.Input[str]
    """The artifact store's volume for the rollout's event log and state."""


class ModelServingArgs(TypedDict):
    runtime: Runtime
    spec: ServingSpec
    models: list[ServedModel]
    registry_url: pulumi.Input[str]
    registry_ca: Optional[pulumi.Input[str]]
    """PEM of the CA MLflow's certificate verifies with, where MLflow speaks TLS."""
    reader_password: pulumi.Input[str]
    """The password of MLflow user `reader`, which replicas fetch the model as; a secret."""
    trusted_model_keys: str
    """The public keys (PEM) whose signature a model version must carry for a replica to load it."""
    drift_window_rows: Optional[int]
    """Rows each replica scores input drift over, when the stage is monitored; None: no drift scoring."""
    rollout: Optional[RolloutWiring]
    """Where the gateway judges and records a green's rollout, when a model declares one."""
    samples_volume: Optional[pulumi.Input[str]]
    """The artifact store's volume the replicas of a model with `sampling` append sampled rows to."""


def model_settings(pin: ModelPin, registry_url: pulumi.Input[str], registry_ca: Optional[pulumi.Input[str]],
                   runtime: str, trusted_model_keys: str) -> dict[str, pulumi.Input[str]]:
    """What a replica needs to fetch, verify and serve its pinned model, but the password."""
    return {
        **({TrackingEnv.CA_CERTIFICATE: registry_ca} if registry_ca is not None else {}),
        ReplicaEnv.SIGNING_KEYS: trusted_model_keys,
        ReplicaEnv.MODEL_NAME: pin.name,
        ReplicaEnv.MODEL_VERSION: str(pin.version),
        ReplicaEnv.MODEL_SHA256: pin.sha256 or "",
        ReplicaEnv.SERVING_RUNTIME: runtime,
        TrackingEnv.URI: registry_url,
        TrackingEnv.USERNAME: READER,
    }


def sampling_env(sampling: Optional[SamplingSpec]) -> dict[str, EnvValue]:
    """What a replica needs to sample (images/serving/serving/sampling.py): one file of its own on the volume."""
    if sampling is None:
        return {}
    return {ReplicaEnv.SAMPLE_FRACTION: str(sampling.fraction),
            ReplicaEnv.SAMPLES_FILE: lambda replica: f"{SAMPLES_DIR}/{replica}.jsonl",
            ReplicaEnv.SAMPLES_MAX_BYTES: str(sampling.max_mb * 1024 * 1024)}


def batching_settings(batching: Optional[BatchingSpec]) -> dict[str, EnvValue]:
    """What a replica needs to batch (images/serving/serving/batching.py; the mlserver runtime hands the same values
    to MLServer's adaptive batching); none: one predict call per request."""
    if batching is None:
        return {}
    return {ReplicaEnv.MAX_BATCH_SIZE: str(batching.max_batch_size),
            ReplicaEnv.MAX_BATCH_TIME_MS: f"{batching.max_batch_time_ms:g}"}


def model_labels(pin: ModelPin) -> dict[str, str]:
    """The pin again, in the clear: the password makes a replica's whole environment secret, so plans and
    diffs show which model a replica serves only through these."""
    return {"mlops.model": pin.name, "mlops.model-version": str(pin.version), "mlops.model-sha256": pin.sha256 or ""}


class ModelServing(pulumi.ComponentResource):
    endpoint: pulumi.Output[str]
    serving_image_digests: dict[str, pulumi.Output[str]]
    """Each model's blue serving image, by model name: what promotion copies."""
    scrape_targets: list[ScrapeTarget]
    """The gateway and every replica (on a swarm, every task of each), for Prometheus."""

    def __init__(self, name: str, args: ModelServingArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        runtime = args["runtime"]
        super().__init__(runtime.type_token(TYPE), name, None, opts)
        spec = args["spec"]
        reader = SecretEnv(args["reader_password"], resource_name=f"{name}-reader-secret", purpose="mlflow-reader",
                           file="mlflow-reader-password")
        self.scrape_targets = []
        self.serving_image_digests = {}
        routes: list[GatewayRoute] = []
        replicas: list[pulumi.Resource] = []
        for model in args["models"]:
            route, deployed = self._pools(name, model, args, reader)
            routes.append(route)
            replicas += deployed

        rollout = args["rollout"] if any(route.rollout is not None for route in routes) else None
        publish = Publish(GATEWAY_PORT, spec.port)
        gateway = runtime.deploy(Workload(
            resource_name=f"{name}-gateway",
            name=gateway_name(runtime.stack),
            component="serving-gateway",
            image=runtime.image(f"{name}-gateway-image", parent=self, image="gateway", source=spec.gateway.image).runs,
            limits=spec.gateway.limits,
            health=HttpHealth(GATEWAY_PORT, "/gateway/health", spec.health_check),
            role=Role.EDGE,
            env=gateway_env(routes, rollout.prometheus_url if rollout is not None else None,
                            rollout.scrape_interval_s if rollout is not None else None),
            volumes=[VolumeMount(rollout.log_volume, ROLLOUT_DIR)] if rollout is not None else (),
            publish=publish,
            depends_on=replicas,
        ), parent=self)
        self.scrape_targets += [ScrapeTarget("gateway", address, {}, gateway.every_task)
                                for address in gateway.addresses(GATEWAY_METRICS_PORT)]
        self.endpoint = runtime.endpoint(gateway, publish)
        self.register_outputs({"endpoint": self.endpoint, "serving_image_digests": self.serving_image_digests})

    def _pools(self, name: str, model: ServedModel, args: ModelServingArgs,
               reader: SecretEnv) -> tuple[GatewayRoute, list[pulumi.Resource]]:
        """`model`'s blue replicas, and green's when it declares a green slot, and how the gateway routes to them."""
        runtime, spec, deployment = args["runtime"], args["spec"], model.deployment
        # A building stage serves its model's image, which unpickles the project's own classes; a promoted stage
        # pulls the pinned digest of that image.
        blue_image = runtime.image(f"{name}-{model.name}-image", parent=self, image="serving", target=spec.runtime,
                                   released=True, model=model.name,
                                   source=ImageSource(build=spec.build) if spec.build is not None
                                   else ImageSource(ref=model.release.images.serving))
        self.serving_image_digests[model.name] = pulumi.Output.from_input(blue_image.digest)
        slots: dict[str, tuple[ModelPin, pulumi.Input[str]]] = {"blue": (model.pin, blue_image.runs)}
        green, green_pin = deployment.green, model.green_pin
        if green is not None and green_pin is not None:
            green_image = blue_image if green.serving_image is None else runtime.image(
                f"{name}-{model.name}-green-image", parent=self, image=f"{model.name}-serving-green",
                source=green.serving_image, released=True)
            slots["green"] = (green_pin, green_image.runs)

        drift_env = ({} if args["drift_window_rows"] is None
                     else {ReplicaEnv.DRIFT_WINDOW_ROWS: str(args["drift_window_rows"])})
        samples_volume = args["samples_volume"]
        sampling = deployment.sampling if samples_volume is not None else None
        upstreams: dict[str, list[str]] = {"green": []}
        resources: list[pulumi.Resource] = []
        for slot, (pin, image) in slots.items():
            deployed = runtime.deploy(Workload(
                resource_name=f"{name}-{model.name}-{slot}",
                name=serving_name(runtime.stack, model.name, slot),
                component="model-serving",
                image=image,
                limits=model.limits,
                health=HttpHealth(SERVING_PORT, "/v2/health/ready", spec.health_check),
                role=Role.SPREAD,
                replicas=model.replicas,
                # A replica that follows `latest` (dev) has nothing to serve until the first training run
                # registers a version, and then turns ready by itself; a pinned one must be ready.
                wait_healthy=pin.is_pinned,
                env={**model_settings(pin, args["registry_url"], args["registry_ca"], spec.runtime,
                                      args["trusted_model_keys"]),
                     TrackingEnv.PASSWORD: reader,
                     **drift_env, **sampling_env(sampling), **batching_settings(deployment.batching)},
                # Writable: each replica appends to its own file; the image owns SAMPLES_DIR, so uid 10001 may.
                volumes=([VolumeMount(samples_volume, SAMPLES_DIR)]
                         if samples_volume is not None and sampling is not None else ()),
                tmp_mb=REPLICA_TMP_MB,
                labels=model_labels(pin),
                identity={"mlops.slot": slot},
            ), parent=self)
            resources += deployed.resources
            upstreams[slot] = deployed.addresses(SERVING_PORT)
            self.scrape_targets += [ScrapeTarget("serving", address, replica_labels(slot, pin), deployed.every_task)
                                    for address in deployed.addresses(SERVING_METRICS_PORT)]
        rollout = args["rollout"]
        policy = green.rollout if green is not None and rollout is not None else None
        return GatewayRoute(model.name, upstreams["blue"], upstreams["green"], deployment.traffic,
                            (green_pin, policy) if green_pin is not None and policy is not None else None), resources
