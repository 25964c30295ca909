"""The rules of a stage that span fields: what its kind requires, and what a swarm stage requires."""
from __future__ import annotations

from typing import Optional

from mlops_spec.contract import serving_name
from mlops_spec.errors import excerpt
from mlops_spec.models import (
    DIGEST_REF,
    MAX_DNS_LABEL,
    MAX_REPLICAS,
    ImageSource,
    ModelDeployment,
    StageSpec,
    SwarmSpec,
)
from mlops_spec.project import build_context_problem, model_project_file, project_root


def check_invariants(spec: StageSpec) -> list[tuple[str, str]]:
    """Rules that span fields; returns (field path, message) for each one broken."""
    broken: list[tuple[str, str]] = []
    if spec.promote_from is not None and spec.builds_workloads:
        broken.append(("promote_from", f"{spec.kind} stages build their own images and follow their newest model; "
                                       "nothing is promoted into them: remove promote_from"))
    elif spec.promote_from is None and not spec.builds_workloads:
        broken.append(("kind", f"{spec.kind} stages run only what is promoted to them: add promote_from: <stage> "
                               "naming the stage their releases come from"))
    elif spec.promote_from == spec.stage:
        broken.append(("promote_from", f"{spec.stage} cannot be promoted from itself"))
    if spec.builds_workloads:
        for name in sorted(spec.models):
            if not (project_root() / model_project_file(name)).is_file():
                broken.append((f"models.{name}", f"{spec.kind} stages build each model's images from its project, and "
                                                 f"{model_project_file(name)} does not exist; add the project "
                                                 "(docs/models.md) or remove the model"))
        for path, context in (("training.build", spec.training.build), ("serving.build", spec.serving.build)):
            if context is None:
                broken.append((path, f"{spec.kind} stages build their workload images: set a build context"))
            elif (problem := build_context_problem(context)) is not None:
                broken.append((path, problem))
    else:
        for path, context in (("training.build", spec.training.build), ("serving.build", spec.serving.build)):
            if context is not None:
                broken.append((path, f"{spec.kind} never builds workload images (build once, promote by digest); remove it"))
    for name, deployment in sorted(spec.models.items()):
        broken.extend(model_problems(spec, name, deployment))
    if spec.kind in ("staging", "prod"):
        for path, image in spec.images().items():
            ref = image.ref if isinstance(image, ImageSource) else image
            if ref is not None and not DIGEST_REF.fullmatch(ref):
                broken.append((path, f"'{excerpt(ref)}' is not pinned by digest; use name@sha256:<64 hex> (no 'latest', no bare tag)"))
    if spec.kind in ("staging", "prod"):
        own = f"{spec.image_registry_server}/{spec.stage}/"
        for path, ref in spec.promoted_image_pins().items():
            if not spec.image_registry.enabled or spec.image_registry_server is None:
                broken.append(("image_registry", f"{spec.stage} runs promoted images ({path}), which are copied "
                                                 "into its own image registry: enable it with a fixed port.host_port"))
            elif DIGEST_REF.fullmatch(ref) and not ref.startswith(own):
                broken.append((path, f"'{ref}' names another stage's registry; {spec.stage} pulls only from its own "
                                     f"({own}<image>@sha256:<digest>): promote with `mlops promote --to {spec.stage}`, "
                                     "which copies the image there"))
    if spec.kind in ("staging", "prod") and spec.docker.insecure:
        broken.append(("docker.insecure", f"{spec.kind} stages reach their Docker host over TLS only: remove insecure "
                                          "and set up TLS on the host (docs/hosts-and-clusters.md)"))
    if spec.kind == "prod":
        declared = {"serving.replicas": spec.serving.replicas} | {
            f"models.{name}.replicas": deployment.replicas for name, deployment in sorted(spec.models.items())
            if deployment.replicas is not None}
        broken.extend((path, f"prod serves each model with at least 2 replicas, got {replicas}")
                      for path, replicas in declared.items() if replicas < 2)
        if not spec.artifact_store.protect:
            broken.append(("artifact_store.protect", "prod data volumes must be protected: set true"))
    if spec.swarm is not None:
        broken.extend(swarm_problems(spec, spec.swarm))
    if spec.kind == "experiment" and spec.experiment is None:
        broken.append(("experiment", "experiment stages carry their name, owner and expiry"))
    return broken


def model_problems(spec: StageSpec, name: str, deployment: ModelDeployment) -> list[tuple[str, str]]:
    """Rules of the stage's model `name`, which the stage file declares at models.<name>."""
    broken: list[tuple[str, str]] = []
    path = f"models.{name}"
    release, green = deployment.release, deployment.green
    longest = f"{serving_name(spec.stage, name, 'green')}-{MAX_REPLICAS - 1}"
    if len(longest) > MAX_DNS_LABEL:
        broken.append((path, f"replica names such as {longest} would be longer than {MAX_DNS_LABEL} characters, "
                             "a DNS label: use a shorter model or stage name"))
    if not spec.builds_workloads:
        if release is not None:
            if not release.is_pinned:
                broken.append((f"{path}.release", "outside dev, pin the model by an integer version and its sha256"))
            for role in ("training", "serving"):
                if getattr(release.images, role) is None:
                    broken.append((f"{path}.release.images.{role}", "promoted stages run the image digest promoted "
                                                                     "to them: name@sha256:<digest>"))
        if green is not None and not green.is_pinned:
            broken.append((f"{path}.green", "outside dev, pin the model by an integer version and its sha256"))
    if green is not None and release is None:
        broken.append((f"{path}.green", "a green slot serves another version next to blue: declare the model's "
                                        "release first"))
    if deployment.traffic.green > 0 and green is None:
        broken.append((f"{path}.traffic.green", "is above 0 but no green release of the model is declared to "
                                                "receive it"))
    rollout = green.rollout if green is not None else None
    scrape_interval_s = spec.monitoring.scrape_interval_s if spec.monitoring is not None else None
    if rollout is not None and scrape_interval_s is None:
        broken.append((f"{path}.green.rollout", "a rollout is judged from the stage's Prometheus: declare "
                                                "'monitoring' too"))
    elif rollout is not None and scrape_interval_s is not None and rollout.bake_time_s < 4 * scrape_interval_s:
        broken.append((f"{path}.green.rollout.bake_time_s", f"{rollout.bake_time_s} s is shorter than 4 scrapes of "
                                                            f"monitoring.scrape_interval_s ({scrape_interval_s} "
                                                            "s), the least a step is judged over"))
    elif rollout is not None and rollout.steps[0] <= deployment.traffic.green:
        broken.append((f"{path}.green.rollout.steps", f"the first step ({rollout.steps[0]}) must be above the "
                                                      f"declared {path}.traffic.green ({deployment.traffic.green}), "
                                                      "where the rollout starts"))
    batching = deployment.batching
    if batching is not None and batching.max_batch_time_ms >= spec.serving.health_check.timeout_s * 1000:
        broken.append((f"{path}.batching.max_batch_time_ms",
                       f"{batching.max_batch_time_ms:g} ms is not below serving.health_check.timeout_s "
                       f"({spec.serving.health_check.timeout_s} s): a request would wait for company longer than a "
                       "replica may take to answer at all; use a few milliseconds"))
    if deployment.sampling is not None and spec.serving.runtime != "oip":
        broken.append((f"{path}.sampling", f"the {spec.serving.runtime} runtime does not sample requests; use "
                                           "serving.runtime oip, or remove sampling"))
    return broken


def swarm_problems(spec: StageSpec, swarm: SwarmSpec) -> list[tuple[str, str]]:
    """Rules of a swarm stage; the rest of its spec means what it means on one host."""
    broken: list[tuple[str, str]] = []
    for path, port in spec.published_ports().items():
        # Swarm publishes a port on every address of the node: a loopback-only port does not exist there.
        if not port.public or port.bind_address != "0.0.0.0":
            broken.append((path, "a swarm publishes ports on every address of a node: set bind_address: 0.0.0.0 "
                                 "and public: true (and firewall the nodes' network)"))
    for name, deployment in sorted(spec.models.items()):
        if deployment.green is not None and deployment.green.rollout is not None:
            broken.append((f"models.{name}.green.rollout", "not on a swarm stage: every edge node runs a gateway of "
                                                            "its own, and each would move green's weight and record "
                                                            "the rollout on its own; move the model's traffic in the "
                                                            "stage file instead"))
        if deployment.sampling is not None:
            broken.append((f"models.{name}.sampling", "not on a swarm stage: replicas run on many nodes and the "
                                                      "samples volume is local to one; remove the sampling or 'swarm'"))
    if spec.image_registry.enabled and spec.image_registry.port.host_port != int(swarm.registry_address.rpartition(":")[2]):
        broken.append(("swarm.registry_address", f"the port must be image_registry.port.host_port "
                                                 f"({spec.image_registry.port.host_port}), where the registry listens"))
    if not spec.image_registry.enabled:
        broken.append(("image_registry.enabled", "a swarm stage needs its registry: every node pulls the stage's images from it"))
    for model in spec.served_models():
        for resource in ("cpus", "memory_mb"):
            if getattr(swarm.reservations, resource) > getattr(model.limits, resource):
                broken.append((f"swarm.reservations.{resource}", f"reserves more than {model.name}'s replicas may use "
                                                                f"({resource} {getattr(model.limits, resource)})"))
    if spec.training.gpu and not (swarm.training.generic_resources or swarm.training.constraints):
        broken.append(("training.gpu", "on a swarm, place GPU training with swarm.training.generic_resources "
                                       "(e.g. {NVIDIA-GPU: 1}) or a node label in swarm.training.constraints"))
    return broken


def promotion_chain(specs: dict[str, StageSpec], stage: str) -> list[str]:
    """The stages a release passes on its way to `stage`, from the stage that builds (and signs) it to `stage`."""
    chain = [stage]
    while (source := specs[chain[0]].promote_from) is not None:
        chain.insert(0, source)
    return chain


def promotion_order(specs: dict[str, StageSpec]) -> list[str]:
    """The stages so that each comes after the stage it is promoted from: chain after chain, the longest first
    (a deployment in this order meets dev -> staging -> prod before a lone example stage), stages promoted from
    one stage in name order."""
    promoted_into: dict[Optional[str], list[str]] = {}
    for name in sorted(specs):
        promoted_into.setdefault(specs[name].promote_from, []).append(name)

    def downstream(name: str) -> int:
        return sum(1 + downstream(child) for child in promoted_into.get(name, []))

    order: list[str] = []
    roots = sorted(promoted_into.get(None, []), key=lambda root: (-downstream(root), root))
    pending = list(reversed(roots))
    while pending:
        name = pending.pop()
        order.append(name)
        pending.extend(reversed(promoted_into.get(name, [])))
    return order
