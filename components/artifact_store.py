"""Named volumes that hold everything a stage must not lose: model artifacts, registry metadata, images, the
labelled training data (`S-datasets`, which `mlops data add` fills and `mlops train --data` reads) and, when
serving samples requests, the sampled rows and predictions to label next (`S-samples`)."""
from __future__ import annotations

from typing import Optional, TypedDict

import pulumi
import pulumi_docker as docker

from mlops_spec.contract import (
    ARTIFACTS_VOLUME,
    COMPONENT_LABEL,
    DATASETS_VOLUME,
    METRICS_VOLUME,
    MLFLOW_DB_VOLUME,
    REGISTRY_DATA_VOLUME,
    ROLLOUT_VOLUME,
    SAMPLES_VOLUME,
    volume_name,
)
from mlops_spec.models import ArtifactStoreSpec

VOLUMES = (ARTIFACTS_VOLUME, MLFLOW_DB_VOLUME)


class ArtifactStoreArgs(TypedDict):
    stack: str
    spec: ArtifactStoreSpec
    labels: dict[str, str]
    """Identity labels only: a label edit would replace the volume and delete its data."""
    retain_on_delete: bool
    """Keep the Docker volumes when Pulumi deletes the resources (every stage but throw-away experiments,
    whose volumes `mlops exp gc` removes by label)."""
    registry: bool
    """Also hold the image registry's storage (stages with an image registry)."""
    metrics: bool
    """Also hold Prometheus's time series and the rollout controller's event log (stages that declare
    `monitoring`)."""
    datasets: bool
    """Also hold labelled training data (single-host stages: on a swarm the volume would be local to whichever
    node ran `mlops data`, so it refuses a swarm stage)."""
    samples: bool
    """Also hold the rows serving samples (stages where a model declares `sampling`)."""


class ArtifactStore(pulumi.ComponentResource):
    artifacts_volume: pulumi.Output[str]
    mlflow_db_volume: pulumi.Output[str]
    registry_data_volume: Optional[pulumi.Output[str]]
    metrics_volume: Optional[pulumi.Output[str]]
    rollout_volume: Optional[pulumi.Output[str]]
    datasets_volume: Optional[pulumi.Output[str]]
    samples_volume: Optional[pulumi.Output[str]]

    def __init__(self, name: str, args: ArtifactStoreArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("mlops:artifact_store:ArtifactStore", name, None, opts)
        protect = args["spec"].protect
        retain = args["retain_on_delete"] or protect
        labels = [docker.VolumeLabelArgs(label=key, value=value)
                  for key, value in sorted({**args["labels"], COMPONENT_LABEL: "artifact-store"}.items())]
        volumes = {
            volume: docker.Volume(
                f"{name}-{volume}",
                name=volume_name(args["stack"], volume),
                labels=labels,
                # A volume's data outlives its resource: retain_on_delete keeps the Docker volume when the
                # resource is deleted or replaced, so a destroy, a rename in code or a ForceNew edit never
                # deletes models or images (a later `pulumi up` finds the volume again by its name).
                # Protect (prod) makes Pulumi refuse the delete outright.
                opts=pulumi.ResourceOptions(parent=self, protect=protect, retain_on_delete=retain),
            ).name
            for volume in VOLUMES + ((REGISTRY_DATA_VOLUME,) if args["registry"] else ())
            + ((DATASETS_VOLUME,) if args["datasets"] else ())
            + ((METRICS_VOLUME, ROLLOUT_VOLUME) if args["metrics"] else ())
            + ((SAMPLES_VOLUME,) if args["samples"] else ())
        }
        self.artifacts_volume = volumes[ARTIFACTS_VOLUME]
        self.mlflow_db_volume = volumes[MLFLOW_DB_VOLUME]
        self.registry_data_volume = volumes.get(REGISTRY_DATA_VOLUME)
        self.metrics_volume = volumes.get(METRICS_VOLUME)
        self.rollout_volume = volumes.get(ROLLOUT_VOLUME)
        self.datasets_volume = volumes.get(DATASETS_VOLUME)
        self.samples_volume = volumes.get(SAMPLES_VOLUME)
        self.register_outputs({
            "artifacts_volume": self.artifacts_volume,
            "mlflow_db_volume": self.mlflow_db_volume,
            **({"registry_data_volume": self.registry_data_volume} if self.registry_data_volume is not None else {}),
            **({"metrics_volume": self.metrics_volume} if self.metrics_volume is not None else {}),
            **({"rollout_volume": self.rollout_volume} if self.rollout_volume is not None else {}),
            **({"datasets_volume": self.datasets_volume} if self.datasets_volume is not None else {}),
            **({"samples_volume": self.samples_volume} if self.samples_volume is not None else {}),
        })
