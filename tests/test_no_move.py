"""Nothing moves on a live stack: the code of this tree renders every shipped stage (and the variants in
tests/stage_renderings.py) exactly as the code of BASE did, compared the way `mlops diff` compares two
renderings. BASE is the commit before the workload contract (components/workload.py) replaced the mirrored
single-host and Swarm component trees: an existing stack's `pulumi up` must replace, add or remove nothing.

A deliberate change of what a stage runs since BASE goes into INTENDED_CHANGES, by resource type and field
path, so it is stated, reviewed, and checked to stay an in-place update."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mlops.diff import compare
from mlops.plan import PlannedResource
from mlops_spec.project import REPO_ROOT
from tests.stage_renderings import EXPERIMENT, VARIANTS

BASE = "945247a"
RENDERER = Path(__file__).with_name("stage_renderings.py")
# The code, program and stage files of BASE; the build contexts stay the work tree's, so image content tags
# compare the code and not the images.
BASE_PATHS = ("components", "mlops", "environments", "__main__.py", "Pulumi.yaml", "pyproject.toml")
REGISTRY_BCRYPT = ("the registry's htpasswd line at bcrypt cost 10, not 5 (issue 18): the registry container (its "
                   "Swarm secret) is replaced once; its data volume is kept")
INTENDED_CHANGES: dict[str, tuple[str, set[str]]] = {
    "image-registry-server": (REGISTRY_BCRYPT, {"envs", "taskSpec.containerSpec.secrets", "taskSpec.containerSpec.mounts"}),
    "image-registry-secret": (REGISTRY_BCRYPT, {"data", "name"}),
    **{service: ("a service's /tmp at mode 0o777, the bits the provider reads back (issue 19): an in-place update, "
                 "once", {"taskSpec.containerSpec.mounts"})
       for service in ("serving-blue", "serving-green", "model-registry-server", "monitoring-prometheus")},
    # The gateway's image changes with it, which replaces the gateway container (or updates the service) anyway.
    "serving-gateway": ("the gateway routes by model (issue 17): one GATEWAY_MODELS variable lists each model's "
                        "pools, weights and rollout in place of UPSTREAM_*/WEIGHT_*/ROLLOUT_POLICY/GREEN_RELEASE; and, "
                        "as the other services, its /tmp at mode 0o777 (issue 19)",
                        {"envs", "taskSpec.containerSpec.env", "taskSpec.containerSpec.mounts"}),
}
"""resource name without its stack -> (why, field paths as `mlops diff` names them) that changed on purpose since
BASE; only these may be replaced."""
MODEL_IMAGES = "a building stage (dev, cluster) runs its model's images (issue 17, components/images.py)"
MODEL_IMAGES_ADDED = {"training-image-model", "training-image-model-push", "serving-image-model",
                      "serving-image-model-push"}
"""Resources a building stage gained on purpose since BASE (MODEL_IMAGES): each platform image (`*-image`, unchanged)
gets the model project's layer on top, built locally and pushed."""
MODEL_IMAGES_REMOVED = {"training-image-push", "serving-image-push"}
"""...and lost: the platform image is no longer pushed, its model layer is."""
INTENDED_CHANGES |= {
    **{f"serving-{slot}-{index}": (MODEL_IMAGES, {"image"}) for slot in ("blue", "green") for index in range(2)},
    **{f"serving-{slot}": (f"{INTENDED_CHANGES[f'serving-{slot}'][0]}; {MODEL_IMAGES}",
                           {*INTENDED_CHANGES[f"serving-{slot}"][1], "taskSpec.containerSpec.image"})
       for slot in ("blue", "green")},
}

DAY_TWO = ("each service declares its stage's platform, which Swarm writes into the placement of a service it creates "
           "and the provider reads back, and is replaced delete-before-replace, its name being fixed (issue 19): an "
           "in-place update, once, and an option of Pulumi's")
SERVICES = ("image-registry-server", "model-registry-server", "monitoring-prometheus", "serving-blue", "serving-green",
            "serving-gateway")
INTENDED_CHANGES |= {
    service: ("; ".join(filter(None, (INTENDED_CHANGES.get(service, ("", set()))[0], DAY_TWO))),
              {*INTENDED_CHANGES.get(service, ("", set()))[1], "taskSpec.placement.platforms", "opts.deleteBeforeReplace"})
    for service in SERVICES}


def intended(change, stack: str) -> set[str]:
    return INTENDED_CHANGES.get(change.name.removeprefix(f"{stack}-"), ("", set()))[1]


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
    (base / "images").symlink_to(REPO_ROOT / "images")
    return renderings(base), renderings(REPO_ROOT)


@pytest.mark.parametrize("variant", [*VARIANTS, EXPERIMENT])
def test_every_resource_keeps_its_urn_inputs_and_dependencies(variant, before_and_after):
    stack = VARIANTS[variant][0] if variant in VARIANTS else EXPERIMENT
    before = [r for r in before_and_after[0][variant] if r.name.removeprefix(f"{stack}-") not in MODEL_IMAGES_REMOVED]
    after = [r for r in before_and_after[1][variant] if r.name.removeprefix(f"{stack}-") not in MODEL_IMAGES_ADDED]
    changes, unchanged = compare(before, after, stack, stack)
    moved = [(change.status, change.action, change.name, change.replace_fields) for change in changes
             if change.action in ("create", "delete") or (change.action == "replace"
                                                           and not set(change.replace_fields) <= intended(change, stack))]
    assert moved == [], f"{variant}: resources that `pulumi up` would add, delete or replace"
    unintended = [(change.name, field.path, field.before, field.after) for change in changes
                  for field in change.fields
                  if not any(field.path == path or field.path.startswith((f"{path}.", f"{path}["))
                             for path in intended(change, stack))]
    assert unintended == [], f"{variant}: inputs that changed since {BASE}"
    # The same parent chain (so the same URN) and the same order of creation.
    # Workloads that depended on a platform image depend on its model layer now (MODEL_IMAGES).
    assert [(r.type, r.name, r.parent, r.dependencies) for r in before] == \
           [(r.type, r.name, r.parent, tuple(d.replace("-image-model", "-image") for d in r.dependencies)) for r in after]
    assert unchanged + len(changes) == len(after)
