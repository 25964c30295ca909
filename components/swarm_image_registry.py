"""The stage's image registry as a Swarm service on the stateful node, published in host mode at the address
every node pulls from (`swarm.registry_address`); its htpasswd line arrives as a Swarm secret file."""
from __future__ import annotations

from typing import TypedDict

import pulumi

from components.image_registry import REGISTRY_PORT, htpasswd_entry
from components.images import BuildSettings, image_id
from components.services import hardened_service, secret_file, swarm_secret
from mlops_spec.models import ImageRegistrySpec, SwarmSpec

SECRET_FILE = "registry-htpasswd"


class SwarmImageRegistryArgs(TypedDict):
    stack: str
    spec: ImageRegistrySpec
    swarm: SwarmSpec
    builds: BuildSettings
    network_id: pulumi.Input[str]
    data_volume: pulumi.Input[str]
    password: pulumi.Input[str]
    labels: dict[str, str]
    identity: dict[str, str]
    """Labels that never change for the life of a service (stack.identity_labels)."""


class SwarmImageRegistry(pulumi.ComponentResource):
    server: pulumi.Output[str]

    def __init__(self, name: str, args: SwarmImageRegistryArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("mlops:swarm_image_registry:SwarmImageRegistry", name, None, opts)
        spec = args["spec"]
        stack = args["stack"]
        entry = pulumi.Output.secret(args["password"]).apply(lambda password: htpasswd_entry(spec.username, password, stack))
        secret = swarm_secret(f"{name}-secret", parent=self, stack=stack, purpose="registry", value=entry)
        service = hardened_service(
            f"{name}-server",
            parent=self,
            name=f"{stack}-image-registry",
            # The registry cannot pull itself: it runs on the manager (the stateful node) by local image ID.
            image=image_id(f"{name}-image", parent=self, stack=stack, image="registry", source=spec.image,
                           settings=args["builds"]),
            network_id=args["network_id"],
            limits=spec.limits, reservations=spec.limits,
            labels=args["labels"], identity=args["identity"], component="image-registry",
            health_check=spec.health_check, health_path=(REGISTRY_PORT, "/"),
            replicas=1, order="stop-first", converge=True,
            constraints=[f"node.labels.{args['swarm'].stateful_label} == true"],
            env={"REGISTRY_HTPASSWD_ENTRY_FILE": f"/run/secrets/{SECRET_FILE}"},
            secrets=[secret_file(secret, SECRET_FILE)],
            published=(REGISTRY_PORT, spec.port.host_port),
            volumes={"/var/lib/registry": args["data_volume"]},
        )
        # Known once the service converged, so pushes wait for a registry that answers.
        self.server = service.name.apply(lambda _: args["swarm"].registry_address)
        self.register_outputs({"server": self.server})
