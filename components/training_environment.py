"""The training image: built from locked dependencies in dev and experiments, pulled by digest elsewhere."""
from __future__ import annotations

from typing import Optional, TypedDict

import pulumi

from components.images import build_image, pulled_image
from components.runtimes import Runtime
from mlops.spec import TrainingSpec


class TrainingEnvironmentArgs(TypedDict):
    runtime: Runtime
    """Whose registry a built image is pushed to and a promoted one pulled from."""
    spec: TrainingSpec
    promoted_image: Optional[str]


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
                                context=spec.build, settings=runtime.builds, push=runtime.push, push_after=registry)
            self.image_ref = image.image_name
            self.image_digest = image.repo_digest
        else:
            pulled = pulled_image(f"{name}-image", parent=self, ref=args["promoted_image"],
                                  platform=runtime.builds.platform, depends_on=registry)
            self.image_ref = pulled.name
            self.image_digest = pulled.repo_digest
        self.register_outputs({"image_ref": self.image_ref, "image_digest": self.image_digest})
