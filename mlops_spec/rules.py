"""The rules of a stage that span fields: what its kind requires, and what a swarm stage requires."""
from __future__ import annotations

from typing import Optional

from mlops_spec.errors import excerpt
from mlops_spec.models import DIGEST_REF, ImageSource, StageSpec, SwarmSpec
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
        if spec.release is not None and not (project_root() / model_project_file(spec.release.model.name)).is_file():
            broken.append(("release.model.name", f"{spec.kind} stages build the model's images from its project, and "
                                                 f"{model_project_file(spec.release.model.name)} does not exist; add "
                                                 "the project (docs/models.md) or name a model that has one"))
        for path, context in (("training.build", spec.training.build), ("serving.build", spec.serving.build)):
            if context is None:
                broken.append((path, f"{spec.kind} stages build their workload images: set a build context"))
            elif (problem := build_context_problem(context)) is not None:
                broken.append((path, problem))
    else:
        for path, context in (("training.build", spec.training.build), ("serving.build", spec.serving.build)):
            if context is not None:
                broken.append((path, f"{spec.kind} never builds workload images (build once, promote by digest); remove it"))
        if spec.release is not None:
            pin = spec.release.model
            if not pin.is_pinned:
                broken.append(("release.model", "outside dev, pin the model by an integer version and its sha256"))
            for role in ("training", "serving"):
                if getattr(spec.release.images, role) is None:
                    broken.append((f"release.images.{role}", "promoted stages run the image digest promoted to them: name@sha256:<digest>"))
        if spec.serving.green is not None and not spec.serving.green.model.is_pinned:
            broken.append(("serving.green.model", "outside dev, pin the model by an integer version and its sha256"))

    green = spec.serving.green
    if green is not None and spec.release is not None and green.model.name != spec.release.model.name:
        # The gateway routes /v2/models/<name>/ to blue and green alike: a green of another model would answer its
        # share of the blue model's requests with 404.
        broken.append(("serving.green.model.name", f"'{excerpt(green.model.name)}' is another model than blue's "
                                                   f"release.model.name ({spec.release.model.name}): the green slot "
                                                   "serves another version of the same model"))
    if spec.serving.traffic.green > 0 and spec.serving.green is None:
        broken.append(("serving.traffic.green", "is above 0 but no 'serving.green' release is declared to receive it"))
    rollout = spec.serving.green.rollout if spec.serving.green is not None else None
    scrape_interval_s = spec.monitoring.scrape_interval_s if spec.monitoring is not None else None
    if rollout is not None and scrape_interval_s is None:
        broken.append(("serving.green.rollout", "a rollout is judged from the stage's Prometheus: declare "
                                                "'monitoring' too"))
    elif rollout is not None and scrape_interval_s is not None and rollout.bake_time_s < 4 * scrape_interval_s:
        broken.append(("serving.green.rollout.bake_time_s", f"{rollout.bake_time_s} s is shorter than 4 scrapes of "
                                                            f"monitoring.scrape_interval_s ({scrape_interval_s} "
                                                            "s), the least a step is judged over"))
    elif rollout is not None and rollout.steps[0] <= spec.serving.traffic.green:
        broken.append(("serving.green.rollout.steps", f"the first step ({rollout.steps[0]}) must be above the declared "
                                                      f"serving.traffic.green ({spec.serving.traffic.green}), where "
                                                      "the rollout starts"))
    batching = spec.serving.batching
    if batching is not None and batching.max_batch_time_ms >= spec.serving.health_check.timeout_s * 1000:
        broken.append(("serving.batching.max_batch_time_ms",
                       f"{batching.max_batch_time_ms:g} ms is not below serving.health_check.timeout_s "
                       f"({spec.serving.health_check.timeout_s} s): a request would wait for company longer than a "
                       "replica may take to answer at all; use a few milliseconds"))
    if spec.serving.sampling is not None and spec.serving.runtime != "oip":
        broken.append(("serving.sampling", f"the {spec.serving.runtime} runtime does not sample requests; use "
                                           "serving.runtime oip, or remove sampling"))
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
    if spec.kind == "prod":
        if spec.serving.replicas < 2:
            broken.append(("serving.replicas", f"prod serves with at least 2 replicas, got {spec.serving.replicas}"))
        if not spec.artifact_store.protect:
            broken.append(("artifact_store.protect", "prod data volumes must be protected: set true"))
    if spec.swarm is not None:
        broken.extend(swarm_problems(spec, spec.swarm))
    if spec.kind == "experiment" and spec.experiment is None:
        broken.append(("experiment", "experiment stages carry their name, owner and expiry"))
    return broken


def swarm_problems(spec: StageSpec, swarm: SwarmSpec) -> list[tuple[str, str]]:
    """Rules of a swarm stage; the rest of its spec means what it means on one host."""
    broken: list[tuple[str, str]] = []
    for path, port in spec.published_ports().items():
        # Swarm publishes a port on every address of the node: a loopback-only port does not exist there.
        if not port.public or port.bind_address != "0.0.0.0":
            broken.append((path, "a swarm publishes ports on every address of a node: set bind_address: 0.0.0.0 "
                                 "and public: true (and firewall the nodes' network)"))
    if spec.serving.green is not None and spec.serving.green.rollout is not None:
        broken.append(("serving.green.rollout", "not on a swarm stage: every edge node runs a gateway of its own, "
                                                "and each would move green's weight and record the rollout on its "
                                                "own; move serving.traffic in the stage file instead"))
    if spec.serving.sampling is not None:
        broken.append(("serving.sampling", "not on a swarm stage: replicas run on many nodes and the samples volume "
                                           "is local to one; remove 'serving.sampling' or 'swarm'"))
    if spec.image_registry.enabled and spec.image_registry.port.host_port != int(swarm.registry_address.rpartition(":")[2]):
        broken.append(("swarm.registry_address", f"the port must be image_registry.port.host_port "
                                                 f"({spec.image_registry.port.host_port}), where the registry listens"))
    if not spec.image_registry.enabled:
        broken.append(("image_registry.enabled", "a swarm stage needs its registry: every node pulls the stage's images from it"))
    for resource in ("cpus", "memory_mb"):
        if getattr(swarm.reservations, resource) > getattr(spec.serving.limits, resource):
            broken.append((f"swarm.reservations.{resource}", f"reserves more than serving.limits.{resource} "
                                                            f"({getattr(spec.serving.limits, resource)}) allows"))
    if spec.training.gpu and not (swarm.training.generic_resources or swarm.training.constraints):
        broken.append(("training.gpu", "on a swarm, place GPU training with swarm.training.generic_resources "
                                       "(e.g. {NVIDIA-GPU: 1}) or a node label in swarm.training.constraints"))
    return broken


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
