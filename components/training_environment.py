"""Training: the model's image (the platform's runner with the model project on top, components/images.py), built
from locked dependencies in dev and experiments and pulled by digest elsewhere,
and the run `mlops train` starts in it (on one host a `docker run`, on a swarm a one-shot job)."""
from __future__ import annotations

from typing import Optional, Sequence, TypedDict

import pulumi

from components.images import build_image, pulled_image
from components.runtimes import Runtime
from components.workload import Run, SecretEnv, VolumeMount
from mlops_spec.contract import (
    DATASETS_DIR,
    DATASETS_VOLUME,
    TRAINER,
    TrackingEnv,
    TrainingEnv,
    network_name,
    tracking_uri,
    volume_name,
)
from mlops_spec.models import StageSpec, TrainingSpec

TRAINING_ENTRYPOINT = ("python3", "-m", "mlops_training")
"""images/training/Dockerfile's ENTRYPOINT."""
PASSWORD_FILE = "mlflow-trainer-password"


class TrainingEnvironmentArgs(TypedDict):
    runtime: Runtime
    """Whose registry a built image is pushed to and a promoted one pulled from."""
    spec: TrainingSpec
    promoted_image: Optional[str]
    model: Optional[str]
    """The model whose training image a building stage builds (its project on the platform image); None: the
    platform image alone, for a stage with no model yet."""


class TrainingEnvironment(pulumi.ComponentResource):
    image_ref: pulumi.Output[str]
    """What `mlops train` runs: the built image's name, or the promoted digest reference."""
    image_digest: pulumi.Output[str]

    def __init__(self, name: str, args: TrainingEnvironmentArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("mlops:training_environment:TrainingEnvironment", name, None, opts)
        spec = args["spec"]
        runtime = args["runtime"]
        registry = list(runtime.registry)
        if spec.build is not None:
            image = build_image(f"{name}-image", parent=self, stack=runtime.stack, image="training",
                                context=spec.build, settings=runtime.builds, push=runtime.push, push_after=registry,
                                model=runtime.model_image(args["model"]))
            self.image_ref = image.image_name
            self.image_digest = image.repo_digest
        else:
            assert args["promoted_image"] is not None, "the stage rules give a stage that does not build a promoted image"
            pulled = pulled_image(f"{name}-image", parent=self, ref=args["promoted_image"],
                                  platform=runtime.builds.platform, depends_on=registry)
            self.image_ref = pulled.name
            self.image_digest = pulled.repo_digest
        self.register_outputs({"image_ref": self.image_ref, "image_digest": self.image_digest})


def training_run(spec: StageSpec, *, name: str, image: str, digest: str, args: Sequence[str], password: str,
                 mlflow_ca: Optional[str], labels: dict[str, str], with_datasets: bool = False) -> Run:
    """One training run on the stage's network as MLflow user `trainer`, within `training.limits`; with
    `with_datasets`, the stage's datasets volume read-only: nothing a run does can change what a later one
    trains on. On a swarm it is placed by `swarm.training`, and its password is the Swarm secret
    `<name>-password`. `mlflow_ca` is the CA that MLflow's certificate verifies with, where it speaks TLS."""
    placement = spec.swarm.training if spec.swarm is not None else None
    return Run(
        component="training-run", name=name, image=image, entrypoint=TRAINING_ENTRYPOINT, args=args,
        limits=spec.training.limits, labels=labels, network=network_name(spec.stage),
        env={TrackingEnv.URI: tracking_uri(spec.stage, mlflow_ca is not None),
             **({TrackingEnv.CA_CERTIFICATE: mlflow_ca} if mlflow_ca is not None else {}),
             TrackingEnv.USERNAME: TRAINER,
             TrackingEnv.PASSWORD: SecretEnv(password, resource_name=f"{name}-password",
                                             purpose="mlflow-trainer", file=PASSWORD_FILE),
             TrainingEnv.IMAGE_DIGEST: digest},
        volumes=[VolumeMount(volume_name(spec.stage, DATASETS_VOLUME), DATASETS_DIR, read_only=True)]
        if with_datasets else (),
        gpus=spec.training.gpu,
        constraints=placement.constraints if placement else (),
        generic_resources=placement.generic_resources if placement else {})
