"""Figure 4: from nothing to every container of a dev stage healthy, dev as shipped with both its models, and the
sizes of the images."""
from __future__ import annotations

import secrets
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime

from benchmarks import builds
from benchmarks import stage as bench_stage
from benchmarks.model import payloads
from benchmarks.report import Figure, alternate, median, rounds_text, spread
from tests.engine import StageOnEngine

GOAL_S = 30
BASE_IMAGE = "mlops-base:bookworm"
MIB = 1024**2
# What "the same packages" means per image, measured inside it: the venv's Python packages, or for the
# registry the Debian package that is the registry.
SITE_PACKAGES_BYTES = "du -sb \"$(python3 -c 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])')\" | cut -f1"
PACKAGE_SIZE_COMMANDS = {
    "training": SITE_PACKAGES_BYTES,
    "serving": SITE_PACKAGES_BYTES,
    "registry": "echo $(( $(dpkg-query -W -f '${Installed-Size}' docker-registry) * 1024 ))",
}
PACKAGE_DESCRIPTIONS = {"training": "Python packages of its lock (site-packages)",
                        "serving": "Python packages of the `oip` lock (site-packages)",
                        "registry": "Debian `docker-registry` (dpkg Installed-Size), already part of the base"}
PACKAGES_IN_BASE = {"registry"}


def spinup_tag(image: str) -> str:
    return f"mlops-bench/{image}:spinup"


def prebuild(images: dict[str, builds.ImageBuild]) -> None:
    """Build every image the stage builds under a tag of our own, so the stage's builds come from the cache
    and its teardown, which removes the images it tagged, leaves the cache in place for the next round."""
    builds.build_all(images, spinup_tag)


def started_after(container, start: float) -> float:
    container.reload()
    started_at = container.attrs["State"]["StartedAt"]
    # Docker writes nanoseconds; datetime reads microseconds.
    seconds, _, fraction = started_at.rstrip("Z").partition(".")
    moment = datetime.fromisoformat(f"{seconds}.{fraction[:6] or '0'}+00:00")
    return moment.timestamp() - start


@dataclass(frozen=True)
class SpinUp:
    """Seconds from the start of the deploy until each milestone."""
    mlflow_answering: float
    serving_started: float
    """Until the last model's first replica started."""
    all_healthy: float


def spin_up_once(trained: dict[str, bytes], image_registry: bool) -> SpinUp:
    """dev as shipped (with `image_registry`: pushing its images into one), every model it serves registered
    (`trained`, by model) as soon as MLflow answers."""
    stack = bench_stage.unique_stack("spinup")
    stage = StageOnEngine(stack=stack, spec=bench_stage.dev_spec(image_registry=image_registry),
                          registry_password=secrets.token_hex(16))
    try:
        start = time.time()
        started, mlflow_answered_at = bench_stage.deploy_with_models(stage, trained)
        all_healthy = time.time() - start
        replicas = [started[bench_stage.first_replica(stack, model)] for model in bench_stage.served(stage.spec)]
        return SpinUp(mlflow_answering=mlflow_answered_at - start,
                      serving_started=max(started_after(replica, start) for replica in replicas), all_healthy=all_healthy)
    finally:
        stage.teardown()


def goal_verdict(runs: list[SpinUp]) -> str:
    return "met" if median(run.all_healthy for run in runs) < GOAL_S else "missed"


def package_size(image: str, name: str) -> int:
    measured = subprocess.run(["docker", "run", "--rm", "--entrypoint", "sh", image, "-c", PACKAGE_SIZE_COMMANDS[name]],
                              capture_output=True, text=True, check=True)
    return int(measured.stdout.strip())


# The figure before deploys waited for health and followed the dependency graph (BENCHMARKS.md at a2ae41d,
# `make bench` on 2026-11-25): the fixture then ran in phases, every push before any container of its phase.
BEFORE_HEALTH_WAITS = {"with registry": "42.8 (42.0–43.4)", "without registry": "16.2 (14.5–16.3)"}


def measure(rounds: int = 3) -> Figure:
    # With its registry: the images of both variants, the registry's included, are built and sized.
    spec = bench_stage.dev_spec(image_registry=True)
    models = bench_stage.served(spec)
    images = builds.stage_builds("bench", spec)
    prebuild(images)
    trained = payloads(models)
    # The stage builds with BuildKit, whose cache the classic pre-build above does not fill: one untimed
    # spin-up makes every timed one start from built images, as the goal says.
    spin_up_once(trained, image_registry=True)
    # The comparison isolates what pushing the workload images into a registry of the stage's own costs.
    samples = alternate({"as shipped": lambda: spin_up_once(trained, image_registry=False),
                         "with registry": lambda: spin_up_once(trained, image_registry=True)}, rounds)
    shipped, pushing = samples["as shipped"], samples["with registry"]
    model_list = " and ".join(f"`{model}`" for model in models)
    figure = Figure(
        title="Spin-up and image sizes",
        goal=f"a dev stage as shipped ({len(models)} models) goes from nothing to every container healthy in under "
             f"{GOAL_S} s, images already built; images no larger than `python:3.11-slim` plus the same packages.",
        headers=["measurement", "value"],
        rows=[[f"dev stage as shipped ({len(models)} models: {model_list}, one replica each; its images stay on its "
               "engine, nothing pushed), nothing → every container healthy, s: median (min–max)",
               spread([run.all_healthy for run in shipped])],
              ["… the same before health waits and graph order, with one model (a2ae41d), s",
               BEFORE_HEALTH_WAITS["without registry"]],
              ["… until MLflow first answered, s", spread([run.mlflow_answering for run in shipped])],
              ["… until every model's replica started, s", spread([run.serving_started for run in shipped])],
              ["dev stage with an image registry of its own (every image pushed into it, as a dev on a swarm does; "
               "dev as shipped until 2026-12-07), nothing → every container healthy, s",
               spread([run.all_healthy for run in pushing])],
              ["… the same before health waits and graph order, with one model (a2ae41d), s",
               BEFORE_HEALTH_WAITS["with registry"]],
              ["… until every model's replica started (from its cached local build, while the images are pushed), s",
               spread([run.serving_started for run in pushing])]],
        notes=[f"Spin-up: goal {goal_verdict(shipped)} by dev as shipped, {goal_verdict(pushing)} by a dev with an image "
               f"registry of its own. {rounds_text(rounds)} of each variant, alternating, after one untimed warm-up; "
               "each a new stack `bench-spinup-…` on free host ports, created by `tests/engine.py`'s "
               "`StageOnEngine.deploy` from the dev rendering as the provider would: every resource as soon as what it "
               "depends on is done (the SDK's dependency graph), BuildKit builds (all cached), with a registry pushes "
               "only once the registry container is healthy, each model's push after the previous model's on the same "
               "platform image (which mounts the platform's layers rather than uploading them again), and every "
               "container with `wait` waited for until healthy, as `pulumi up` now does; "
               "timed until Docker reports every container healthy (health checks every 5 s, so the figure is "
               "rounded up to the next check). Torn down after each round, untimed. The rows marked a2ae41d are "
               "the figure before health waits, when the fixture ran in phases and dev served one model.",
               "What the push costs is CPU: the engine gzips every layer of both models' images, each on "
               "one core, while the containers start. dev as shipped skips it, and `mlops promote --from dev` "
               "does the compression instead, for the promoted model's two images only, with skopeo's parallel gzip "
               "(docs/promotion.md).",
               f"dev as shipped serves {model_list}, each with its own training and serving images (its project's "
               "code and lock on the platform image) and its own replica. A dev replica serves its model's newest "
               "version, so the harness registers one of each model (as `mlops train --model` would: the iris "
               "pipeline of figure 1, and a scaled `Ridge` on scikit-learn's diabetes data) through MLflow's REST "
               "API as soon as MLflow answers, concurrently with the deploy. Without the image registry every "
               "container starts at once, and the replicas retry (or are restarted) until MLflow has their model."],
    )
    base_size = builds.image_size(BASE_IMAGE)
    figure.rows.append([f"base image `{BASE_IMAGE}` (Debian bookworm minbase, python3, nginx-light, docker-registry)",
                        f"{base_size / MIB:.0f} MiB"])
    for name, description in PACKAGE_DESCRIPTIONS.items():
        tag = spinup_tag(name)
        size, packages = builds.image_size(tag), package_size(tag, name)
        reference = base_size if name in PACKAGES_IN_BASE else base_size + packages
        figure.rows.append([f"`{name}` image" + (f" (target `{images[name].target}`)" if images[name].target else ""),
                            f"{size / MIB:.0f} MiB = base + {(size - base_size) / MIB:.0f} MiB; {description}: "
                            f"{packages / MIB:.0f} MiB; image − (base + packages) = {(size - reference) / MIB:+.0f} MiB"])
    for image in images.values():
        if builds.PLATFORM_ARG in image.args:
            platform = builds.repository(image.args[builds.PLATFORM_ARG])
            added = builds.image_size(spinup_tag(image.name)) - builds.image_size(spinup_tag(platform))
            figure.rows.append([f"`{image.name}` image (FROM the `{platform}` image)",
                                f"`{platform}` + {added / MIB:.1f} MiB: the project's code and the packages only its "
                                "lock adds"])
    figure.notes.append(
        "`python:3.11-slim` cannot be pulled here (no image registry is reachable), so it was not measured. "
        "The images start FROM the local base instead; each row shows the image against that base plus the same "
        "packages measured inside the image, so what the image adds beyond its packages is the difference.")
    return figure
