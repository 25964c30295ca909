"""An MLflow tracking and model registry server whose artifacts live in the stage's artifact store, open only
to the users its image creates from the password hashes this component derives from the stage's MLflow secret
(docs/contracts.md). Published off loopback, it speaks TLS with a certificate from a CA made from that secret
(mlops_spec/service_tls.py), on the stage network too, so a swarm's replicas verify it across nodes.

On a swarm it runs on the stateful node, where its database and artifact volumes live, by the image ID built
there (nothing to pull); the hashes reach it as a Swarm secret file, never as a variable."""
from __future__ import annotations

import functools
import hashlib
from typing import Optional, TypedDict

import pulumi

from components.images import image_id
from components.runtimes import ComponentType, Runtime
from components.workload import HttpHealth, Publish, Role, SecretEnv, ServiceTls, VolumeMount, Workload
from mlops_spec.contract import (
    ADMIN,
    ARTIFACTS_DIR,
    IDENTITIES,
    MLFLOW_DB_DIR,
    MLFLOW_PORT,
    MlflowEnv,
    derived_password,
    model_registry_name,
    tracking_uri,
)
from mlops_spec.models import ModelRegistrySpec

TYPE = ComponentType(single_host="mlops:model_registry:ModelRegistry",
                     swarm="mlops:swarm_model_registry:SwarmModelRegistry")
# Werkzeug's default method and salt alphabet, which MLflow's auth store checks logins with.
SCRYPT_METHOD = "scrypt:32768:8:1"
SALT_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


@functools.cache
def mlflow_password_hashes(secret: str, stack: str) -> str:
    """`identity:hash` per line, the admin first: each identity's derived password as MLflow stores it (werkzeug's
    `scrypt:N:r:p$salt$hex`). The container gets these rather than the secret, so neither its configuration
    nor its processes hold anything a login could use. The salt derives from stack, identity and password, as
    the image registry's htpasswd line does and for the same reason: a random one would replace the container
    on every `pulumi up`. Cached: each hash costs about 0.1 s, and a program renders the same stage once."""
    n, r, p = (int(part) for part in SCRYPT_METHOD.split(":")[1:])
    lines = []
    for identity in (ADMIN, *IDENTITIES):
        password = derived_password(secret, identity)
        seed = hashlib.sha256(f"{stack}\0{identity}\0{password}".encode()).digest()
        salt = "".join(SALT_ALPHABET[byte % len(SALT_ALPHABET)] for byte in seed[:16])
        digest = hashlib.scrypt(password.encode(), salt=salt.encode(), n=n, r=r, p=p, maxmem=132 * n * r * p)
        lines.append(f"{identity}:{SCRYPT_METHOD}${salt}${digest.hex()}")
    return "\n".join(lines)


class ModelRegistryArgs(TypedDict):
    runtime: Runtime
    spec: ModelRegistrySpec
    artifacts_volume: pulumi.Input[str]
    mlflow_db_volume: pulumi.Input[str]
    published_host: Optional[str]
    """The name other machines reach the stage's host by (tcp:// hosts), which MLflow must accept in the Host
    header; None where the port is reached over loopback or an SSH tunnel."""
    mlflow_password: pulumi.Input[str]
    """The stage's MLflow secret: every user's password derives from it; the container gets only their hashes."""
    trusted_model_keys: Optional[str]
    """The Ed25519 public keys (PEM) the stage's replicas trust, which a model version's signature must verify
    with; None where the stage serves nothing and trusts no key."""


class ModelRegistry(pulumi.ComponentResource):
    internal_url: pulumi.Output[str]
    host_port: pulumi.Output[Optional[int]]
    ca_certificate: Optional[pulumi.Output[str]]
    """PEM of the CA its certificate verifies with, where its port is published off loopback and it speaks TLS."""

    def __init__(self, name: str, args: ModelRegistryArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        runtime = args["runtime"]
        super().__init__(runtime.type_token(TYPE), name, None, opts)
        spec = args["spec"]
        stack = runtime.stack
        published_host = args["published_host"]
        # Replicas and training runs verify it by its name on the stage network, mlops by the published host.
        tls = ServiceTls.off_loopback(spec.port, args["mlflow_password"], stack, "model-registry",
                                      (model_registry_name(stack), "model-registry",
                                       *([published_host] if published_host else [])))
        server = runtime.deploy(Workload(
            resource_name=f"{name}-server",
            name=model_registry_name(stack),
            component="model-registry",
            image=image_id(f"{name}-image", parent=self, stack=stack, image="mlflow", source=spec.image,
                           settings=runtime.builds),
            limits=spec.limits,
            health=HttpHealth(MLFLOW_PORT, "/health", spec.health_check, tls=tls is not None),
            # One SQLite database on one volume.
            role=Role.STATEFUL,
            env={MlflowEnv.PASSWORD_HASHES: SecretEnv(
                     pulumi.Output.secret(args["mlflow_password"]).apply(
                         lambda secret: mlflow_password_hashes(secret, stack)),
                     resource_name=f"{name}-secret", purpose="mlflow", file="mlflow-password-hashes"),
                 **({MlflowEnv.PUBLISHED_HOST: f"{published_host}:{spec.port.host_port}"}
                    if published_host and spec.port.host_port else {}),
                 **({MlflowEnv.TRUSTED_MODEL_KEYS: args["trusted_model_keys"]} if args["trusted_model_keys"] else {}),
                 **(tls.env(name, "mlflow") if tls is not None else {})},
            publish=Publish(MLFLOW_PORT, spec.port),
            volumes=[VolumeMount(args["mlflow_db_volume"], MLFLOW_DB_DIR),
                     VolumeMount(args["artifacts_volume"], ARTIFACTS_DIR)],
            aliases=["model-registry"],
        ), parent=self)
        # Derived from the container or service, so replicas that fetch from it start only once it is healthy.
        self.internal_url = server.name.apply(lambda _: tracking_uri(stack, tls is not None))
        assert server.host_port is not None
        self.host_port = server.host_port
        self.ca_certificate = None if tls is None else tls.ca_certificate
        self.register_outputs({"internal_url": self.internal_url, "host_port": self.host_port,
                               "ca_certificate": self.ca_certificate})
