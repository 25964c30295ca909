"""A private image registry with htpasswd authentication; the password comes only from a Pulumi secret (on a
swarm as a Swarm secret file). Published off loopback, it speaks TLS with a certificate from a CA made from that
secret (mlops_spec/service_tls.py)."""
from __future__ import annotations

import hashlib
from typing import Optional, TypedDict

import bcrypt
import pulumi

from components.images import image_id
from components.runtimes import ComponentType, Runtime
from components.workload import HttpHealth, Publish, Role, SecretEnv, ServiceTls, VolumeMount, Workload
from mlops_spec.contract import IMAGE_REGISTRY_PORT, REGISTRY_DATA_DIR, RegistryEnv, image_registry_name
from mlops_spec.models import ImageRegistrySpec

TYPE = ComponentType(single_host="mlops:image_registry:ImageRegistry",
                     swarm="mlops:swarm_image_registry:SwarmImageRegistry")
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
    runtime: Runtime
    spec: ImageRegistrySpec
    data_volume: pulumi.Input[str]
    password: pulumi.Input[str]
    published_hosts: tuple[str, ...]
    """The names other machines reach it by (the tcp:// host, a swarm's registry address), which its certificate
    names when it speaks TLS."""


class ImageRegistry(pulumi.ComponentResource):
    """On a swarm it runs on the stateful node, published in host mode at the address every node pulls from
    (`swarm.registry_address`); there it cannot pull itself, so it runs by local image ID on the manager,
    which is the stateful node."""

    server: pulumi.Output[str]
    ca_certificate: Optional[pulumi.Output[str]]
    """PEM of the CA its certificate verifies with, where its port is published off loopback and it speaks TLS."""

    def __init__(self, name: str, args: ImageRegistryArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        runtime = args["runtime"]
        super().__init__(runtime.type_token(TYPE), name, None, opts)
        spec = args["spec"]
        stack = runtime.stack
        entry = pulumi.Output.secret(args["password"]).apply(lambda password: htpasswd_entry(spec.username, password, stack))
        tls = ServiceTls.off_loopback(spec.port, args["password"], stack, "image-registry",
                                      (image_registry_name(stack), "image-registry", *args["published_hosts"]))
        registry = runtime.deploy(Workload(
            resource_name=f"{name}-server",
            name=image_registry_name(stack),
            component="image-registry",
            image=image_id(f"{name}-image", parent=self, stack=stack, image="registry", source=spec.image,
                           settings=runtime.builds),
            limits=spec.limits,
            health=HttpHealth(IMAGE_REGISTRY_PORT, "/", spec.health_check, tls=tls is not None),
            role=Role.STATEFUL,
            env={RegistryEnv.HTPASSWD_ENTRY: SecretEnv(entry, resource_name=f"{name}-secret", purpose="registry",
                                                       file="registry-htpasswd"),
                 **(tls.env(name, "registry") if tls is not None else {})},
            publish=Publish(IMAGE_REGISTRY_PORT, spec.port),
            volumes=[VolumeMount(args["data_volume"], REGISTRY_DATA_DIR)],
            aliases=["image-registry"],
        ), parent=self)
        self.server = runtime.registry_server(registry)
        self.ca_certificate = None if tls is None else tls.ca_certificate
        self.register_outputs({"server": self.server, "ca_certificate": self.ca_certificate})
