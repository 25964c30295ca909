"""MLflow as a Swarm service pinned to the stateful node, where its database and artifact volumes live; the
stage's MLflow secret reaches it as a Swarm secret file, never as a variable."""
from __future__ import annotations

from typing import Optional, TypedDict

import pulumi

from components.images import BuildSettings, image_id
from components.model_registry import MLFLOW_PORT
from components.services import hardened_service, secret_file, swarm_secret
from mlops_spec.models import ModelRegistrySpec, SwarmSpec

SECRET_FILE = "mlflow-password"


class SwarmModelRegistryArgs(TypedDict):
    stack: str
    spec: ModelRegistrySpec
    swarm: SwarmSpec
    builds: BuildSettings
    network_id: pulumi.Input[str]
    artifacts_volume: pulumi.Input[str]
    mlflow_db_volume: pulumi.Input[str]
    labels: dict[str, str]
    identity: dict[str, str]
    """Labels that never change for the life of a service (stack.identity_labels)."""
    published_host: Optional[str]
    mlflow_password: pulumi.Input[str]


class SwarmModelRegistry(pulumi.ComponentResource):
    internal_url: pulumi.Output[str]
    host_port: pulumi.Output[int]

    def __init__(self, name: str, args: SwarmModelRegistryArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("mlops:swarm_model_registry:SwarmModelRegistry", name, None, opts)
        spec = args["spec"]
        stack = args["stack"]
        secret = swarm_secret(f"{name}-secret", parent=self, stack=stack, purpose="mlflow",
                              value=args["mlflow_password"])
        published_host = args["published_host"]
        service = hardened_service(
            f"{name}-server",
            parent=self,
            name=f"{stack}-model-registry",
            # Built on the manager, which is the stateful node, and run there by ID: nothing to pull.
            image=image_id(f"{name}-image", parent=self, stack=stack, image="mlflow", source=spec.image,
                           settings=args["builds"]),
            network_id=args["network_id"],
            limits=spec.limits, reservations=spec.limits,
            labels=args["labels"], identity=args["identity"], component="model-registry",
            health_check=spec.health_check, health_path=(MLFLOW_PORT, "/health"),
            replicas=1,
            # One SQLite database on one volume: the old task stops before the new one opens it.
            order="stop-first", converge=True,
            constraints=[f"node.labels.{args['swarm'].stateful_label} == true"],
            env={"MLOPS_MLFLOW_PASSWORD_FILE": f"/run/secrets/{SECRET_FILE}",
                 **({"MLOPS_PUBLISHED_HOST": f"{published_host}:{spec.port.host_port}"}
                    if published_host and spec.port.host_port else {})},
            secrets=[secret_file(secret, SECRET_FILE)],
            published=(MLFLOW_PORT, spec.port.host_port),
            volumes={"/data/db": args["mlflow_db_volume"], "/data/artifacts": args["artifacts_volume"]},
        )
        self.internal_url = pulumi.Output.concat("http://", service.name, f":{MLFLOW_PORT}")
        self.host_port = pulumi.Output.from_input(spec.port.host_port)
        self.register_outputs({"internal_url": self.internal_url, "host_port": self.host_port})
