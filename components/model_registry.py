"""An MLflow tracking and model registry server whose artifacts live in the stage's artifact store."""
from __future__ import annotations

from typing import TypedDict

import pulumi
import pulumi_docker as docker

from components.containers import container_labels, hardened_container, http_healthcheck, published
from components.images import image_id
from mlops.spec import ModelRegistrySpec

MLFLOW_PORT = 5000


class ModelRegistryArgs(TypedDict):
    stack: str
    spec: ModelRegistrySpec
    base_image: str
    network: pulumi.Input[str]
    artifacts_volume: pulumi.Input[str]
    mlflow_db_volume: pulumi.Input[str]
    labels: dict[str, str]


class ModelRegistry(pulumi.ComponentResource):
    internal_url: pulumi.Output[str]
    host_port: pulumi.Output[int]

    def __init__(self, name: str, args: ModelRegistryArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("mlops:model_registry:ModelRegistry", name, None, opts)
        spec = args["spec"]
        stack = args["stack"]
        hostname = f"{stack}-model-registry"
        container = hardened_container(
            f"{name}-server",
            parent=self,
            name=hostname,
            image=image_id(f"{name}-image", parent=self, stack=stack, image="mlflow", source=spec.image,
                           base_image=args["base_image"]),
            network=args["network"],
            limits=spec.limits,
            labels=container_labels(args["labels"], "model-registry"),
            healthcheck=http_healthcheck(MLFLOW_PORT, "/health", spec.health_check),
            ports=published(MLFLOW_PORT, spec.port),
            volumes=[
                docker.ContainerVolumeArgs(volume_name=args["mlflow_db_volume"], container_path="/data/db"),
                docker.ContainerVolumeArgs(volume_name=args["artifacts_volume"], container_path="/data/artifacts"),
            ],
            aliases=["model-registry"],
        )
        self.internal_url = pulumi.Output.from_input(f"http://{hostname}:{MLFLOW_PORT}")
        self.host_port = container.ports.apply(lambda ports: ports[0].external)
        self.register_outputs({"internal_url": self.internal_url, "host_port": self.host_port})
