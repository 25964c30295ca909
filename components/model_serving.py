"""Serving replicas of the pinned model behind a gateway that splits traffic between blue and green.

With `serving.sampling`, each replica also appends the declared share of its infer rows, with their predictions,
to a file of its own on the artifact store's samples volume (at most `max_mb` each), the next training data to
label (`mlops data samples`); never unless declared."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, TypedDict

import pulumi
import pulumi_docker as docker

from components.artifact_store import SAMPLES_DIR
from components.containers import container_labels, hardened_container, published
from components.images import BuildSettings, PushTarget, build_image, image_id
from components.monitoring import ScrapeTarget, replica_labels
from mlops_spec.contract import READER, ROLLOUT_DIR, gateway_env
from mlops_spec.models import BatchingSpec, ModelPin, Release, SamplingSpec, ServingSpec

SERVING_PORT = 8080
GATEWAY_PORT = 8080
# Metrics on ports of their own, reached only on the stage network: neither is published or routed.
REPLICA_METRICS_PORT = 8082
GATEWAY_METRICS_PORT = 9102


@dataclass(frozen=True)
class RolloutWiring:
    prometheus_url: str
    """The stage's Prometheus as the gateway reaches it on the stage network."""
    scrape_interval_s: int
    log_volume: pulumi.Input[str]
    """The artifact store's volume for the rollout's event log and state."""


class ModelServingArgs(TypedDict):
    stack: str
    spec: ServingSpec
    release: Release
    builds: BuildSettings
    registry_url: pulumi.Input[str]
    reader_password: pulumi.Input[str]
    """The password of MLflow user `reader`, which replicas fetch the model as; a secret."""
    network: pulumi.Input[str]
    push: Optional[PushTarget]
    depends_on: list[pulumi.Resource]
    labels: dict[str, str]
    drift_window_rows: Optional[int]
    """Rows each replica scores input drift over, when the stage is monitored; None: no drift scoring."""
    rollout: Optional[RolloutWiring]
    """Where the gateway judges and records green's rollout, when one is declared."""
    samples_volume: Optional[pulumi.Input[str]]
    """The artifact store's volume the replicas append sampled rows to, when `spec.sampling` is declared."""


def model_settings(pin: ModelPin, registry_url: pulumi.Input[str], runtime: str) -> dict[str, pulumi.Input[str]]:
    """What a replica needs to fetch and serve its pinned model, but the password."""
    return {
        "MODEL_NAME": pin.name,
        "MODEL_VERSION": str(pin.version),
        "MODEL_SHA256": pin.sha256 or "",
        "SERVING_RUNTIME": runtime,
        "MLFLOW_TRACKING_URI": registry_url,
        "MLFLOW_TRACKING_USERNAME": READER,
    }


def model_env(pin: ModelPin, registry_url: pulumi.Input[str], password: pulumi.Input[str],
              runtime: str) -> list[pulumi.Input[str]]:
    return [*(pulumi.Output.concat(f"{key}=", value) if isinstance(value, pulumi.Output) else f"{key}={value}"
              for key, value in model_settings(pin, registry_url, runtime).items()),
            pulumi.Output.concat("MLFLOW_TRACKING_PASSWORD=", pulumi.Output.secret(password))]


def sampling_env(sampling: Optional[SamplingSpec], replica: str) -> list[str]:
    """What a replica needs to sample (images/serving/serving/sampling.py): one file of its own on the volume."""
    if sampling is None:
        return []
    return [f"SAMPLE_FRACTION={sampling.fraction}", f"SAMPLES_FILE={SAMPLES_DIR}/{replica}.jsonl",
            f"SAMPLES_MAX_BYTES={sampling.max_mb * 1024 * 1024}"]


def batching_settings(batching: Optional[BatchingSpec]) -> dict[str, str]:
    """What a replica needs to batch (images/serving/serving/batching.py; the mlserver runtime hands the same values
    to MLServer's adaptive batching); none: one predict call per request."""
    if batching is None:
        return {}
    return {"MAX_BATCH_SIZE": str(batching.max_batch_size), "MAX_BATCH_TIME_MS": f"{batching.max_batch_time_ms:g}"}


def model_labels(pin: ModelPin) -> dict[str, str]:
    """The pin again, in the clear: the password makes a replica's whole `envs` secret, so plans and diffs
    show which model a replica serves only through these."""
    return {"mlops.model": pin.name, "mlops.model-version": str(pin.version), "mlops.model-sha256": pin.sha256 or ""}


class ModelServing(pulumi.ComponentResource):
    endpoint: pulumi.Output[str]
    host_port: pulumi.Output[int]
    serving_image_digest: pulumi.Output[str]
    scrape_targets: list[ScrapeTarget]
    """The gateway and every replica, for Prometheus."""

    def __init__(self, name: str, args: ModelServingArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("mlops:model_serving:ModelServing", name, None, opts)
        spec = args["spec"]
        stack = args["stack"]
        release = args["release"]
        if spec.build is not None:
            built = build_image(f"{name}-image", parent=self, stack=stack, image="serving", context=spec.build,
                                settings=args["builds"], target=spec.runtime, push=args["push"],
                                push_after=args["depends_on"])
            blue_image, released_image = built.image_id, built.repo_digest
        else:
            blue_image = released_image = image_id(f"{name}-image", parent=self, stack=stack, image="serving",
                                                   source=release.images.serving, settings=args["builds"],
                                                   depends_on=args["depends_on"])
        slots: dict[str, tuple[ModelPin, pulumi.Input[str]]] = {"blue": (release.model, blue_image)}
        if spec.green is not None:
            green_image = blue_image if spec.green.serving_image is None else image_id(
                f"{name}-green-image", parent=self, stack=stack, image="serving-green",
                source=spec.green.serving_image, settings=args["builds"], depends_on=args["depends_on"])
            slots["green"] = (spec.green.model, green_image)

        upstreams: dict[str, list[str]] = {}
        self.scrape_targets = []
        drift_env = ([] if args["drift_window_rows"] is None
                     else [f"DRIFT_WINDOW_ROWS={args['drift_window_rows']}"])
        sampling = spec.sampling if args["samples_volume"] is not None else None
        # Writable: each replica appends to its own file; the image owns SAMPLES_DIR, so uid 10001 may.
        samples_mounts = None if sampling is None else [
            docker.ContainerVolumeArgs(volume_name=args["samples_volume"], container_path=SAMPLES_DIR)]
        replicas: list[docker.Container] = []
        for slot, (pin, image) in slots.items():
            labels = container_labels({**args["labels"], **model_labels(pin), "mlops.slot": slot}, "model-serving")
            upstreams[slot] = []
            for index in range(spec.replicas):
                hostname = f"{stack}-serving-{slot}-{index}"
                replicas.append(hardened_container(
                    f"{name}-{slot}-{index}",
                    parent=self,
                    name=hostname,
                    image=image,
                    network=args["network"],
                    limits=spec.limits,
                    labels=labels,
                    health_check=spec.health_check, health_path=(SERVING_PORT, "/v2/health/ready"),
                    # A replica that follows `latest` (dev) has nothing to serve until the first training
                    # run registers a version, and then turns ready by itself; a pinned one must be ready.
                    wait=pin.is_pinned,
                    envs=(model_env(pin, args["registry_url"], args["reader_password"], spec.runtime) + drift_env
                          + sampling_env(sampling, hostname)
                          + [f"{key}={value}" for key, value in batching_settings(spec.batching).items()]),
                    volumes=samples_mounts,
                    tmpfs={"/tmp": "rw,noexec,nosuid,size=256m"},
                ))
                upstreams[slot].append(f"{hostname}:{SERVING_PORT}")
                self.scrape_targets.append(ScrapeTarget("serving", f"{hostname}:{REPLICA_METRICS_PORT}",
                                                        replica_labels(slot, pin)))

        rollout = args["rollout"] if spec.green is not None and spec.green.rollout is not None else None
        gateway = hardened_container(
            f"{name}-gateway",
            parent=self,
            name=f"{stack}-gateway",
            image=image_id(f"{name}-gateway-image", parent=self, stack=stack, image="gateway",
                           source=spec.gateway.image, settings=args["builds"]),
            network=args["network"],
            limits=spec.gateway.limits,
            labels=container_labels(args["labels"], "serving-gateway"),
            health_check=spec.health_check, health_path=(GATEWAY_PORT, "/gateway/health"),
            envs=[
                f"UPSTREAM_BLUE={','.join(upstreams['blue'])}",
                f"UPSTREAM_GREEN={','.join(upstreams.get('green', []))}",
                f"WEIGHT_BLUE={spec.traffic.blue}",
                f"WEIGHT_GREEN={spec.traffic.green}",
                *(gateway_env(spec.green, rollout.prometheus_url, rollout.scrape_interval_s) if rollout is not None else []),
            ],
            volumes=None if rollout is None else [
                docker.ContainerVolumeArgs(volume_name=rollout.log_volume, container_path=ROLLOUT_DIR)],
            ports=published(GATEWAY_PORT, spec.port),
            depends_on=replicas,
        )
        self.scrape_targets.append(ScrapeTarget("gateway", f"{stack}-gateway:{GATEWAY_METRICS_PORT}", {}))
        self.host_port = gateway.ports.apply(lambda ports: ports[0].external)
        self.endpoint = self.host_port.apply(lambda port: f"http://{spec.port.bind_address}:{port}")
        self.serving_image_digest = pulumi.Output.from_input(released_image)
        self.register_outputs({"endpoint": self.endpoint, "host_port": self.host_port,
                               "serving_image_digest": self.serving_image_digest})
