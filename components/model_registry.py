"""An MLflow tracking and model registry server whose artifacts live in the stage's artifact store, open only
to the users its image creates from the stage's MLflow secret (docs/contracts.md).

On a swarm it runs on the stateful node, where its database and artifact volumes live, by the image ID built
there (nothing to pull); the secret reaches it as a Swarm secret file, never as a variable."""
from __future__ import annotations

from typing import Optional, TypedDict

import pulumi

from components.images import image_id
from components.runtimes import ComponentType, Runtime
from components.workload import HttpHealth, Publish, Role, SecretEnv, VolumeMount, Workload
from mlops_spec.contract import ARTIFACTS_DIR, MLFLOW_DB_DIR, MLFLOW_PORT, MlflowEnv, model_registry_name
from mlops_spec.models import ModelRegistrySpec

TYPE = ComponentType(single_host="mlops:model_registry:ModelRegistry",
                     swarm="mlops:swarm_model_registry:SwarmModelRegistry")


class ModelRegistryArgs(TypedDict):
    runtime: Runtime
    spec: ModelRegistrySpec
    artifacts_volume: pulumi.Input[str]
    mlflow_db_volume: pulumi.Input[str]
    published_host: Optional[str]
    """The name other machines reach the stage's host by (tcp:// hosts), which MLflow must accept in the Host
    header; None where the port is reached over loopback or an SSH tunnel."""
    mlflow_password: pulumi.Input[str]
    """The stage's MLflow secret: the image's start script derives every user's password from it."""


class ModelRegistry(pulumi.ComponentResource):
    internal_url: pulumi.Output[str]
    host_port: pulumi.Output[Optional[int]]

    def __init__(self, name: str, args: ModelRegistryArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        runtime = args["runtime"]
        super().__init__(runtime.type_token(TYPE), name, None, opts)
        spec = args["spec"]
        stack = runtime.stack
        published_host = args["published_host"]
        server = runtime.deploy(Workload(
            resource_name=f"{name}-server",
            name=model_registry_name(stack),
            component="model-registry",
            image=image_id(f"{name}-image", parent=self, stack=stack, image="mlflow", source=spec.image,
                           settings=runtime.builds),
            limits=spec.limits,
            health=HttpHealth(MLFLOW_PORT, "/health", spec.health_check),
            # One SQLite database on one volume.
            role=Role.STATEFUL,
            env={MlflowEnv.SECRET: SecretEnv(args["mlflow_password"], resource_name=f"{name}-secret",
                                             purpose="mlflow", file="mlflow-password"),
                 **({MlflowEnv.PUBLISHED_HOST: f"{published_host}:{spec.port.host_port}"}
                    if published_host and spec.port.host_port else {})},
            publish=Publish(MLFLOW_PORT, spec.port),
            volumes=[VolumeMount(args["mlflow_db_volume"], MLFLOW_DB_DIR),
                     VolumeMount(args["artifacts_volume"], ARTIFACTS_DIR)],
            aliases=["model-registry"],
        ), parent=self)
        # Derived from the container or service, so replicas that fetch from it start only once it is healthy.
        self.internal_url = pulumi.Output.concat("http://", server.name, f":{MLFLOW_PORT}")
        assert server.host_port is not None
        self.host_port = server.host_port
        self.register_outputs({"internal_url": self.internal_url, "host_port": self.host_port})
