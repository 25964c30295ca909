"""One stage of the MLOps stack: its Docker host, network, stores, registries, training and serving."""
from __future__ import annotations

from typing import Optional, TypedDict

import pulumi
import pulumi_docker as docker

from components.artifact_store import ArtifactStore
from components.docker_tls import stage_tls
from components.engine_facts import engine_of
from components.image_registry import ImageRegistry
from components.images import BuildSettings, PlatformImages, PushTarget
from components.model_registry import ModelRegistry
from components.model_serving import ModelServing, RolloutWiring
from components.monitoring import Monitoring, ScrapeTarget
from components.runtimes import Runtime, SingleHost, Swarm
from components.training_environment import TrainingEnvironment
from mlops_spec.contract import PROMETHEUS_PORT, READER, derived_password, network_name, prometheus_name
from mlops_spec.models import StageSpec


def identity_labels(spec: StageSpec, stack: str) -> dict[str, str]:
    """Labels that never change for the life of a resource. Volumes and networks carry only these: the
    provider replaces a volume or network whose labels change (`labels` is ForceNew in
    terraform-provider-docker v4.5.0, resource_docker_volume.go and resource_docker_network.go), and
    replacing a volume deletes its data."""
    labels = {"mlops.stage": spec.stage, "mlops.stack": stack}
    if spec.experiment is not None:
        labels["mlops.experiment"] = spec.experiment.name
    return labels


def stage_labels(spec: StageSpec, stack: str) -> dict[str, str]:
    """Identity plus what a team edits routinely (owner, cost centre, expiry), for containers, which an
    edit replaces anyway without losing anything."""
    labels = identity_labels(spec, stack) | {"mlops.owner": spec.labels.owner,
                                             "mlops.cost-centre": spec.labels.cost_centre}
    if spec.experiment is not None:
        labels |= {"mlops.owner": spec.experiment.owner, "mlops.expires-at": spec.experiment.expires_at}
    return labels


def published_hosts(spec: StageSpec) -> tuple[str, ...]:
    """The names other machines reach the stage's published ports by: the tcp:// host, and a swarm's registry."""
    names = [spec.docker.published_host]
    if spec.swarm is not None:
        names.append(spec.swarm.registry_address.rpartition(":")[0])
    return tuple(dict.fromkeys(name for name in names if name))


class MLOpsStackArgs(TypedDict):
    spec: StageSpec
    registry_password: Optional[pulumi.Input[str]]
    mlflow_password: pulumi.Input[str]
    """The stage's MLflow secret, from which every MLflow identity's password derives (mlops_spec/contract.py)."""
    trusted_model_keys: Optional[str]
    """The Ed25519 public keys (PEM) whose signatures the replicas accept; required where the stage serves a model."""


class MLOpsStack(pulumi.ComponentResource):
    network: pulumi.Output[str]
    model_registry_url: pulumi.Output[str]
    model_registry_ca: Optional[pulumi.Output[str]]
    """PEM of the CA that MLflow's certificate verifies with, where it speaks TLS (published off loopback)."""
    image_registry_server: Optional[pulumi.Output[str]]
    image_registry_ca: Optional[pulumi.Output[str]]
    """PEM of the CA that the image registry's certificate verifies with: each engine that pulls from it over
    the network trusts it (docs/hosts-and-clusters.md)."""
    serving_endpoint: Optional[pulumi.Output[str]]
    training_images: dict[str, pulumi.Output[str]]
    """What `mlops train` runs for each model, by model name."""
    training_image_digests: dict[str, pulumi.Output[str]]
    serving_image_digests: dict[str, pulumi.Output[str]]
    monitoring_url: Optional[pulumi.Output[str]]

    def __init__(self, name: str, args: MLOpsStackArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("mlops:stack:MLOpsStack", name, None, opts)
        spec = args["spec"]
        stack = name
        labels = stage_labels(spec, stack)
        builds = BuildSettings.of(spec)
        identity = identity_labels(spec, stack)
        password = args["registry_password"]
        if spec.image_registry.enabled and password is None:
            raise ValueError("the image registry needs the Pulumi config secret mlops:registryPassword")
        # Promoted images are pulled from the stage's own registry, which refuses anonymous pulls.
        registry_auth = None
        if spec.image_registry.enabled and spec.image_registry_server is not None:
            registry_auth = [docker.ProviderRegistryAuthArgs(
                address=spec.image_registry_server, username=spec.image_registry.username,
                password=pulumi.Output.secret(password))]
        tls = stage_tls(spec)
        provider = docker.Provider(
            f"{stack}-docker", host=spec.docker.url, ssh_opts=spec.docker.ssh_opts or None, registry_auth=registry_auth,
            ca_material=pulumi.Output.secret(tls.ca_cert) if tls else None,
            cert_material=pulumi.Output.secret(tls.client_cert) if tls else None,
            key_material=pulumi.Output.secret(tls.client_key) if tls else None,
            opts=pulumi.ResourceOptions(parent=self))
        child = pulumi.ResourceOptions(parent=self, providers=[provider])

        swarm = spec.swarm
        network = docker.Network(
            f"{stack}-network", name=network_name(stack), driver="bridge" if swarm is None else "overlay",
            # Attachable, so `mlops train` can run a one-off task on it and tests can reach services.
            attachable=True if swarm is not None else None,
            labels=[docker.NetworkLabelArgs(label=key, value=value) for key, value in sorted(identity.items())],
            # The name is fixed, so a replacement created first would collide with the old network; deleting
            # first also replaces the containers attached to it (their `networks_advanced` is ForceNew).
            opts=pulumi.ResourceOptions(parent=self, provider=provider, delete_before_replace=True))
        self.network = network.name
        store = ArtifactStore(f"{stack}-artifact-store",
                              {"stack": stack, "spec": spec.artifact_store, "labels": identity,
                               "retain_on_delete": spec.kind != "experiment", "registry": spec.image_registry.enabled,
                               "metrics": spec.monitoring is not None,
                               "datasets": spec.swarm is None, "samples": spec.samples},
                              opts=child)
        # The one place that tells a single host from a swarm: every component renders its workloads through
        # this runtime. Services attach by network ID (what the provider reads back); every edge node answers
        # on the gateway's port, the stateful node on Prometheus': `published_host` names the manager, which is
        # where mlops reaches the stage.
        platforms = PlatformImages(owner=self)
        runtime: Runtime = (
            SingleHost(stack=stack, labels=labels, identity=identity, builds=builds, platforms=platforms,
                       network=network.name, limits_swap=engine_of(spec).limits_swap())
            if swarm is None else
            Swarm(stack=stack, labels=labels, identity=identity, builds=builds, platforms=platforms, spec=swarm,
                  network_id=network.id, published_host=spec.docker.published_host or "127.0.0.1"))
        model_registry = ModelRegistry(f"{stack}-model-registry", {
            "runtime": runtime, "spec": spec.model_registry, "artifacts_volume": store.artifacts_volume,
            "mlflow_db_volume": store.mlflow_db_volume, "published_host": spec.docker.published_host,
            "mlflow_password": args["mlflow_password"], "trusted_model_keys": args["trusted_model_keys"]}, opts=child)
        self.model_registry_url = model_registry.host_port.apply(
            lambda port: f"{'https' if spec.model_registry.port.off_loopback else 'http'}://"
                         f"{spec.model_registry.port.bind_address}:{port}")
        self.model_registry_ca = model_registry.ca_certificate

        self.image_registry_server = self.image_registry_ca = None
        if spec.image_registry.enabled:
            assert password is not None, "declare_stack passes the registry password whenever the registry is enabled"
            assert store.registry_data_volume is not None
            image_registry = ImageRegistry(f"{stack}-image-registry", {
                "runtime": runtime, "spec": spec.image_registry, "data_volume": store.registry_data_volume,
                "password": password, "published_hosts": published_hosts(spec)}, opts=child)
            runtime = runtime.with_registry(
                PushTarget(server=image_registry.server, username=spec.image_registry.username,
                           password=pulumi.Output.secret(password)), [image_registry])
            self.image_registry_server = image_registry.server
            self.image_registry_ca = image_registry.ca_certificate

        # Each model the stage declares gets its training image: built from its project where the stage builds,
        # the promoted digest where its release names one.
        self.training_images, self.training_image_digests = {}, {}
        for model, deployment in sorted(spec.models.items()):
            promoted = deployment.release.images.training if deployment.release is not None else None
            if spec.builds_workloads or promoted is not None:
                training = TrainingEnvironment(f"{stack}-{model}-training", {
                    "runtime": runtime, "spec": spec.training, "promoted_image": promoted, "model": model}, opts=child)
                self.training_images[model] = training.image_ref
                self.training_image_digests[model] = training.image_digest
        self.serving_endpoint = None
        self.serving_image_digests = {}
        scrape_targets: list[ScrapeTarget] = []
        if served := spec.served_models():
            trusted_keys = args["trusted_model_keys"]
            if not trusted_keys:
                raise ValueError("serving needs the Pulumi config mlops:trustedModelKeys")
            # Derived inside the secret, so the derived password is as secret in the state as the root one.
            reader_password = pulumi.Output.secret(args["mlflow_password"]).apply(
                lambda secret: derived_password(secret, READER))
            serving = ModelServing(f"{stack}-serving", {
                "runtime": runtime, "spec": spec.serving, "models": served,
                "registry_url": model_registry.internal_url, "registry_ca": model_registry.ca_certificate,
                "reader_password": reader_password,
                "trusted_model_keys": trusted_keys,
                "drift_window_rows": spec.monitoring.drift_window_rows if spec.monitoring else None,
                "samples_volume": store.samples_volume,
                "rollout": None if spec.monitoring is None or store.rollout_volume is None else RolloutWiring(
                    prometheus_url=f"http://{prometheus_name(stack)}:{PROMETHEUS_PORT}",
                    scrape_interval_s=spec.monitoring.scrape_interval_s, log_volume=store.rollout_volume),
            }, opts=child)
            scrape_targets = serving.scrape_targets
            self.serving_endpoint = serving.endpoint
            self.serving_image_digests = serving.serving_image_digests
        self.monitoring_url = None
        if spec.monitoring is not None and store.metrics_volume is not None:
            monitoring = Monitoring(f"{stack}-monitoring", {
                "runtime": runtime, "spec": spec.monitoring, "data_volume": store.metrics_volume,
                "targets": scrape_targets}, opts=child)
            self.monitoring_url = monitoring.url

        self.register_outputs(self.exports())

    def exports(self) -> dict[str, object]:
        """Stack outputs: endpoints, and each model's image digests that promotion copies. Nothing secret."""
        candidates: dict[str, object] = {
            "network": self.network,
            "model_registry_url": self.model_registry_url,
            "model_registry_ca": self.model_registry_ca,
            "image_registry": self.image_registry_server,
            "image_registry_ca": self.image_registry_ca,
            "serving_endpoint": self.serving_endpoint,
            "monitoring_url": self.monitoring_url,
        }
        models = {model: {key: value for key, value in (
            ("training_image", self.training_images.get(model)),
            ("training_image_digest", self.training_image_digests.get(model)),
            ("serving_image_digest", self.serving_image_digests.get(model))) if value is not None}
            for model in sorted({*self.training_images, *self.serving_image_digests})}
        if models:
            candidates["models"] = models
        return {key: value for key, value in candidates.items() if value is not None}
