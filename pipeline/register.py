"""MLflow Model Registry: log the model, register a version, and gate the ``champion`` alias."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from pipeline.export import predict_savedmodel

CHAMPION = "champion"
CHALLENGER = "challenger"
SAVED_MODEL_DIR = "saved_model"  # inside the registered MLflow model, beside the keras flavor files


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    candidate_accuracy: float
    champion_accuracy: float | None
    floor: float
    reason: str


def decide(candidate_accuracy: float, champion_accuracy: float | None, floor: float) -> GateDecision:
    """Promote only at or above the floor and at or above the current champion (same test data)."""
    if candidate_accuracy < floor:
        promote, reason = False, f"test accuracy {candidate_accuracy:.4f} is below the floor {floor:.4f}"
    elif champion_accuracy is not None and candidate_accuracy < champion_accuracy:
        promote, reason = False, (
            f"test accuracy {candidate_accuracy:.4f} is below the current champion's {champion_accuracy:.4f}"
        )
    elif champion_accuracy is None:
        promote, reason = True, f"no champion yet and {candidate_accuracy:.4f} >= floor {floor:.4f}"
    else:
        promote, reason = True, (
            f"test accuracy {candidate_accuracy:.4f} >= champion's {champion_accuracy:.4f} and >= floor {floor:.4f}"
        )
    return GateDecision(promote, candidate_accuracy, champion_accuracy, floor, reason)


def model_signature() -> ModelSignature:
    """The keras flavor's signature: raw 0-255 pixels as float32 ``[N, 28, 28, 1]``."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 28, 28, 1), "pixels")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10), "probabilities")]),
    )


def log_model(model: keras.Model, saved_model_dir: Path) -> mlflow.models.model.ModelInfo:
    """Log the keras flavor and attach the exported SavedModel under ``saved_model/``.

    No input example: ``mlflow.keras.log_model(input_example=...)`` crashes in MLflow 3.17 (issue 16183).
    """
    info = mlflow.keras.log_model(model, name="model", signature=model_signature())
    MlflowClient().log_model_artifacts(info.model_id, str(saved_model_dir), artifact_path=SAVED_MODEL_DIR)
    return info


def register(model_uri: str, name: str, run_id: str, tags: dict[str, str]) -> ModelVersion:
    version = mlflow.register_model(model_uri, name, tags=tags)
    client = MlflowClient()
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    return client.get_model_version(name, version.version)


def current_champion(name: str) -> ModelVersion | None:
    try:
        return MlflowClient().get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def download_saved_model(model_uri: str, dst: Path | None = None) -> Path:
    """Fetch the SavedModel carried by a registered version (``models:/name@alias`` or ``models:/name/3``)."""
    dst = dst or Path(tempfile.mkdtemp(prefix="mnist-savedmodel-"))
    return Path(mlflow.artifacts.download_artifacts(f"{model_uri.rstrip('/')}/{SAVED_MODEL_DIR}", dst_path=str(dst)))


def saved_model_accuracy(model_uri: str, images: np.ndarray, labels: np.ndarray) -> float:
    with tempfile.TemporaryDirectory(prefix="mnist-eval-") as tmp:
        probabilities = predict_savedmodel(download_saved_model(model_uri, Path(tmp)), images)
    return float((probabilities.argmax(1) == labels).mean())


def promote(name: str, version: str | int) -> None:
    MlflowClient().set_registered_model_alias(name, CHAMPION, str(version))


def delete_version(name: str, version: str | int) -> None:
    """Undo a registration when the run fails after it (a failed run registers nothing)."""
    client = MlflowClient()
    client.delete_model_version(name, str(version))
