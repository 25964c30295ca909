"""The training image: built from locked dependencies in dev and experiments, pulled by digest elsewhere."""
from __future__ import annotations

from typing import Optional, TypedDict

import pulumi

from components.images import BuildSettings, PushTarget, build_image, pulled_image
from mlops_spec.models import TrainingSpec


class TrainingEnvironmentArgs(TypedDict):
    stack: str
    spec: TrainingSpec
    builds: BuildSettings
    promoted_image: Optional[str]
    push: Optional[PushTarget]
    depends_on: list[pulumi.Resource]


class TrainingEnvironment(pulumi.ComponentResource):
    image_ref: pulumi.Output[str]
    """What `mlops train` runs: the built image's name, or the promoted digest reference."""
    image_digest: pulumi.Output[str]

    def __init__(self, name: str, args: TrainingEnvironmentArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("mlops:training_environment:TrainingEnvironment", name, None, opts)
        spec = args["spec"]
        if spec.build is not None:
            image = build_image(f"{name}-image", parent=self, stack=args["stack"], image="training",
                                context=spec.build, settings=args["builds"], push=args["push"],
                                push_after=args["depends_on"])
            self.image_ref = image.image_name
            self.image_digest = image.repo_digest
        else:
            pulled = pulled_image(f"{name}-image", parent=self, ref=args["promoted_image"],
                                  platform=args["builds"].platform, depends_on=args["depends_on"])
            self.image_ref = pulled.name
            self.image_digest = pulled.repo_digest
        self.register_outputs({"image_ref": self.image_ref, "image_digest": self.image_digest})
