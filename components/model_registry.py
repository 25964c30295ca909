"""An MLflow tracking and model registry server whose artifacts live in the stage's artifact store, open only
to the users its image creates from the stage's MLflow secret (docs/contracts.md)."""
from __future__ import annotations

from typing import Optional, TypedDict

import pulumi
import pulumi_docker as docker

from components.containers import container_labels, hardened_container, published
from components.images import BuildSettings, image_id
from mlops_spec.models import ModelRegistrySpec

MLFLOW_PORT = 5000


class ModelRegistryArgs(TypedDict):
    stack: str
    spec: ModelRegistrySpec
    builds: BuildSettings
    network: pulumi.Input[str]
    artifacts_volume: pulumi.Input[str]
    mlflow_db_volume: pulumi.Input[str]
    labels: dict[str, str]
    published_host: Optional[str]
    """The name other machines reach the stage's host by (tcp:// hosts), which MLflow must accept in the Host
    header; None where the port is reached over loopback or an SSH tunnel."""
    mlflow_password: pulumi.Input[str]
    """The stage's MLflow secret: the image's start script derives every user's password from it."""


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
                           settings=args["builds"]),
            network=args["network"],
            limits=spec.limits,
            labels=container_labels(args["labels"], "model-registry"),
            health_check=spec.health_check, health_path=(MLFLOW_PORT, "/health"),
            ports=published(MLFLOW_PORT, spec.port),
            envs=[pulumi.Output.concat("MLOPS_MLFLOW_PASSWORD=", pulumi.Output.secret(args["mlflow_password"])),
                  *([f"MLOPS_PUBLISHED_HOST={args['published_host']}:{spec.port.host_port}"]
                    if args["published_host"] and spec.port.host_port else [])],
            volumes=[
                docker.ContainerVolumeArgs(volume_name=args["mlflow_db_volume"], container_path="/data/db"),
                docker.ContainerVolumeArgs(volume_name=args["artifacts_volume"], container_path="/data/artifacts"),
            ],
            aliases=["model-registry"],
        )
        # Derived from the container, so replicas that fetch from it start only once it is healthy.
        self.internal_url = pulumi.Output.concat("http://", container.name, f":{MLFLOW_PORT}")
        self.host_port = container.ports.apply(lambda ports: ports[0].external)
        self.register_outputs({"internal_url": self.internal_url, "host_port": self.host_port})
