"""What moves on a live stack when this tree's code and stage files replace BASE's: the code of this tree renders
every shipped stage (and the variants in tests/stage_renderings.py) and is compared with BASE's, the way
`mlops diff` compares two renderings. BASE is the commit before stages declared a map of models (issue 17); the
moves before it were checked against the commit before the workload contract (945247a) when they landed.

Only each model's workloads may move: they carry the model's name now (`<stack>-<model>-<slot>-<n>`), so
`pulumi up` replaces them once, and the platform images under the model images are built once per stage.
Everything else keeps its URN and inputs (volumes, networks, MLflow, the registry, Prometheus, the gateway),
but for the fields INTENDED_CHANGES lists."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mlops.diff import compare
from mlops.plan import PlannedResource
from mlops_spec.project import REPO_ROOT
from tests.stage_renderings import EXPERIMENT, VARIANTS

BASE = "6e1c2c7"
RENDERER = Path(__file__).with_name("stage_renderings.py")
# The code, program and stage files of BASE; the build contexts and model projects stay the work tree's, so image
# content tags compare the code and not the images.
BASE_PATHS = ("components", "mlops", "mlops_spec", "environments", "__main__.py", "Pulumi.yaml", "pyproject.toml")
MODEL_WORKLOAD = re.compile(r"serving(-[a-z0-9-]+)?-(blue|green)(-\d+|-secrets(-writer)?)?|serving(-[a-z0-9-]+)?(-green)?-image(-model)?"
                            r"(-push)?|([a-z0-9-]+-)?training(-image(-model)?(-push)?)?|(serving-[a-z]+|training)-platform")
"""Resources (names without the stack) of a model's workloads: its replicas, their images and its training
image, before and after they carried the model's name."""
ROUTES = ("the gateway routes to each model's replicas by their new names (issue 17)",
          {"envs", "taskSpec.containerSpec.env"})
TARGETS = ("Prometheus scrapes each model's replicas by their new names (issue 17)",
           {"envs", "taskSpec.containerSpec.env"})
HASHES = ("MLflow gets its users' password hashes instead of the stage's secret, and the keys a model version's "
          "signature must verify with (issue 18): replaced once, and on a swarm its secret too",
          {"envs", "taskSpec.containerSpec.env", "taskSpec.containerSpec.secrets"})
INTENDED_CHANGES: dict[str, tuple[str, set[str]]] = {
    "serving-gateway": ROUTES, "monitoring-prometheus": TARGETS, "model-registry-server": HASHES}
"""resource name without its stack -> (why, field paths as `mlops diff` names them) that changed on purpose since
BASE in a resource that does not move."""

DAY_TWO = ("each service declares its stage's platform, which Swarm writes into the placement of a service it creates "
           "and the provider reads back, and is replaced delete-before-replace, its name being fixed (issue 19): an "
           "in-place update, once, and an option of Pulumi's; a rollback runs to the end instead of pausing with the "
           "failed release's replicas serving (rollback_config failure_action continue)")
SERVICES = ("image-registry-server", "model-registry-server", "monitoring-prometheus", "serving-blue", "serving-green",
            "serving-gateway")
INTENDED_CHANGES |= {
    service: ("; ".join(filter(None, (INTENDED_CHANGES.get(service, ("", set()))[0], DAY_TWO))),
              {*INTENDED_CHANGES.get(service, ("", set()))[1], "taskSpec.placement.platforms", "opts.deleteBeforeReplace",
               "rollbackConfig.failureAction"})
    for service in SERVICES}
SECRETS_RETAINED = ("a replaced secret is let go of, not deleted, since a rollback after the deploy returns to it, "
                    "and `mlops settle` finds the unmounted ones by their stack's labels (issue 19): each secret is "
                    "replaced once, its services roll onto the new one",
                    {"labels", "opts.retainOnDelete"})
INTENDED_CHANGES |= {secret: SECRETS_RETAINED
                     for secret in ("image-registry-secret", "model-registry-secret", "serving-reader-secret")}
INTENDED_CHANGES["model-registry-secret"] = (f"{SECRETS_RETAINED[0]}; {HASHES[0]}",
                                             {*SECRETS_RETAINED[1], "data", "name"})
TLS = ("MLflow and the image registry speak TLS where they are published off loopback (issue 18): their "
       "certificate, key and a health check over TLS, on a swarm the key as a Swarm secret of its own",
       {"taskSpec.containerSpec.env", "taskSpec.containerSpec.secrets", "taskSpec.containerSpec.healthcheck"})
for service in ("model-registry-server", "image-registry-server"):
    INTENDED_CHANGES[service] = (f"{INTENDED_CHANGES[service][0]}; {TLS[0]}", INTENDED_CHANGES[service][1] | TLS[1])
SECRET_FILES = ("on one host a workload's secrets are files in a volume of its own, which a container that is "
                "created and never started writes, instead of variables in its configuration (issue 18): its "
                "container is replaced once",
                {"envs", "labels", "volumes"})
for container in ("model-registry-server", "image-registry-server"):
    INTENDED_CHANGES[container] = (f"{INTENDED_CHANGES[container][0]}; {SECRET_FILES[0]}",
                                   INTENDED_CHANGES[container][1] | SECRET_FILES[1])
NEW_RESOURCES = {"model-registry-tls-key": TLS[0], "image-registry-tls-key": TLS[0],
                 **{f"{workload}-secrets{writer}": SECRET_FILES[0]
                    for workload in ("model-registry-server", "image-registry-server") for writer in ("", "-writer")}}
"""resource name without its stack -> why it is new since BASE."""
UNPUSHED = ("dev keeps its images on its engine and pushes none (issue 17: half its spin-up went to the pushes), so "
            "it has no image registry; `mlops promote --from dev` takes the images from its engine. The registry's "
            "volume is retained on delete, so `pulumi up` lets go of its data rather than deleting it")
GONE_FROM_DEV = {name: UNPUSHED for name in ("image-registry", "image-registry-image", "image-registry-server",
                                             "artifact-store-registry-data")}
"""resource name without its stack -> why dev and the experiments made from it no longer declare it."""
DEV_CHANGES = {"docker": (UNPUSHED, {"registryAuth"})}
"""As INTENDED_CHANGES, in dev and the experiments only: the provider has no registry to log in to."""
TLS_MANAGER = ("the example swarm stage's manager speaks TLS only (issue 18: plain :2375 was root on it for anyone on "
               "the network): the provider reaches it on 2376 with the stack's client certificate; its resources stay",
               {"host", "caMaterial", "certMaterial", "keyMaterial"})
CLUSTER_CHANGES = {"docker": TLS_MANAGER}
"""As INTENDED_CHANGES, in the cluster stage only."""


def intended(change, stack: str, changes: dict[str, tuple[str, set[str]]] = INTENDED_CHANGES) -> set[str]:
    return changes.get(change.name.removeprefix(f"{stack}-"), ("", set()))[1]


def is_model_workload(name: str, stack: str) -> bool:
    return MODEL_WORKLOAD.fullmatch(name.removeprefix(f"{stack}-")) is not None


def renderings(root: Path) -> dict[str, list[PlannedResource]]:
    ran = subprocess.run([sys.executable, str(RENDERER), str(root), str(root / "environments")],
                         capture_output=True, text=True, cwd=root)
    assert ran.returncode == 0, ran.stderr
    return {variant: [PlannedResource(**{**resource, "dependencies": tuple(resource["dependencies"])})
                      for resource in resources]
            for variant, resources in json.loads(ran.stdout).items()}


@pytest.fixture(scope="module")
def before_and_after(tmp_path_factory) -> tuple[dict, dict]:
    base = tmp_path_factory.mktemp("base")
    archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", BASE, *BASE_PATHS], capture_output=True)
    if archive.returncode != 0:
        pytest.fail(f"commit {BASE} is not in this clone's history (a shallow clone? `git fetch --unshallow`): "
                    f"{archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(base)], input=archive.stdout, check=True)
    for shared in ("images", "models"):
        (base / shared).symlink_to(REPO_ROOT / shared)
    return renderings(base), renderings(REPO_ROOT)


@pytest.mark.parametrize("variant", [*VARIANTS, EXPERIMENT])
def test_only_model_workloads_move_and_everything_else_keeps_its_urn_and_inputs(variant, before_and_after):
    stack = VARIANTS[variant][0] if variant in VARIANTS else EXPERIMENT
    of_dev = variant == EXPERIMENT or VARIANTS[variant][0] == "dev"
    gone, changes_here = (GONE_FROM_DEV, INTENDED_CHANGES | DEV_CHANGES) if of_dev else ({}, INTENDED_CHANGES)
    if stack == "cluster":
        changes_here = changes_here | CLUSTER_CHANGES
    before = [r for r in before_and_after[0][variant]
              if not is_model_workload(r.name, stack) and r.name.removeprefix(f"{stack}-") not in gone]
    assert len(before) + len(gone) == len([r for r in before_and_after[0][variant]
                                           if not is_model_workload(r.name, stack)]), f"{variant}: {sorted(gone)}"
    after = [r for r in before_and_after[1][variant]
             if not is_model_workload(r.name, stack) and r.name.removeprefix(f"{stack}-") not in NEW_RESOURCES]
    changes, unchanged = compare(before, after, stack, stack)
    moved = [(change.status, change.action, change.name, change.replace_fields) for change in changes
             if change.action in ("create", "delete") or (change.action == "replace"
                                                           and not set(change.replace_fields) <= intended(change, stack, changes_here))]
    assert moved == [], f"{variant}: resources that `pulumi up` would add, delete or replace"
    unintended = [(change.name, field.path, field.before, field.after) for change in changes
                  for field in change.fields
                  if not any(field.path == path or field.path.startswith((f"{path}.", f"{path}["))
                             for path in intended(change, stack, changes_here))]
    assert unintended == [], f"{variant}: inputs that changed since {BASE}"
    # The same parent chain (so the same URN) and the same order of creation.
    assert [(r.type, r.name, r.parent) for r in before] == [(r.type, r.name, r.parent) for r in after]
    assert unchanged + len(changes) == len(after)


@pytest.mark.parametrize("variant", ["dev", "prod-released", "cluster-green"])
def test_a_models_workloads_are_renamed_by_the_model_and_every_container_is_replaced_once(variant, before_and_after):
    stack = VARIANTS[variant][0]
    physical = {side: {r.inputs["name"] for r in rendering[variant] if is_model_workload(r.name, stack)
                       and r.type in ("docker:index/container:Container", "docker:index/service:Service")}
                for side, rendering in zip(("before", "after"), before_and_after)}
    renamed = {name.replace(f"{stack}-serving-", f"{stack}-iris-classifier-") for name in physical["before"]}
    assert renamed <= physical["after"], "each replica of iris-classifier now carries the model's name"
    assert not physical["before"] & physical["after"], "no replica keeps a name another could collide with"
