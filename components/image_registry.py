"""A private image registry with htpasswd authentication; the password comes only from a Pulumi secret."""
from __future__ import annotations

import hashlib
from typing import TypedDict

import bcrypt
import pulumi
import pulumi_docker as docker

from components.containers import container_labels, hardened_container, published
from components.images import BuildSettings, image_id
from mlops_spec.models import ImageRegistrySpec

REGISTRY_PORT = 5000
# OWASP's floor for bcrypt. The registry checks the hash on every request (about 0.1 s each at this cost on one
# core; a push makes a few dozen), so not the 12 of a login form.
BCRYPT_COST = 10
BCRYPT_ALPHABET = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def htpasswd_entry(username: str, password: str, stack: str) -> str:
    """A bcrypt htpasswd line whose salt derives from its inputs, so an unchanged password never shows up as a
    change. A random salt cannot be kept instead: the line reaches the registry as a container environment
    variable (a Swarm secret on a cluster stage), which the provider replaces the container (secret) on any
    change of (mlops/replacements.py), and this program keeps no state of its own between runs, so every
    `pulumi up` would hash anew and replace the registry. What a random salt would add, tables computed ahead
    for one stack and user name, costs 2^BCRYPT_COST per guess here, against `make up`'s random 192-bit password."""
    seed = hashlib.sha256(f"{stack}\0{username}\0{password}".encode()).digest()
    salt = f"$2b${BCRYPT_COST:02d}$" + "".join(BCRYPT_ALPHABET[byte % 64] for byte in seed[:21]) + "."
    return f"{username}:{bcrypt.hashpw(password.encode(), salt.encode()).decode()}"


class ImageRegistryArgs(TypedDict):
    stack: str
    spec: ImageRegistrySpec
    builds: BuildSettings
    network: pulumi.Input[str]
    data_volume: pulumi.Input[str]
    password: pulumi.Input[str]
    labels: dict[str, str]


class ImageRegistry(pulumi.ComponentResource):
    server: pulumi.Output[str]
    host_port: pulumi.Output[int]
    username: pulumi.Output[str]

    def __init__(self, name: str, args: ImageRegistryArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("mlops:image_registry:ImageRegistry", name, None, opts)
        spec = args["spec"]
        stack = args["stack"]
        entry = pulumi.Output.secret(args["password"]).apply(lambda password: htpasswd_entry(spec.username, password, stack))
        container = hardened_container(
            f"{name}-server",
            parent=self,
            name=f"{stack}-image-registry",
            image=image_id(f"{name}-image", parent=self, stack=stack, image="registry", source=spec.image,
                           settings=args["builds"]),
            network=args["network"],
            limits=spec.limits,
            labels=container_labels(args["labels"], "image-registry"),
            health_check=spec.health_check, health_path=(REGISTRY_PORT, "/"),
            envs=[pulumi.Output.concat("REGISTRY_HTPASSWD_ENTRY=", entry)],
            ports=published(REGISTRY_PORT, spec.port),
            volumes=[docker.ContainerVolumeArgs(volume_name=args["data_volume"], container_path="/var/lib/registry")],
            aliases=["image-registry"],
        )
        self.host_port = container.ports.apply(lambda ports: ports[0].external)
        # The Docker engine pushes over loopback, which it trusts without TLS.
        self.server = self.host_port.apply(lambda port: f"localhost:{port}")
        self.username = pulumi.Output.from_input(spec.username)
        self.register_outputs({"server": self.server, "host_port": self.host_port, "username": self.username})
