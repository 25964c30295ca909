"""Pulumi component resources of the MLOps stack, one per module."""
from components.artifact_store import ArtifactStore
from components.image_registry import ImageRegistry
from components.model_registry import ModelRegistry
from components.model_serving import ModelServing
from components.stack import MLOpsStack
from components.training_environment import TrainingEnvironment

__all__ = ["ArtifactStore", "ImageRegistry", "ModelRegistry", "ModelServing", "MLOpsStack", "TrainingEnvironment"]
