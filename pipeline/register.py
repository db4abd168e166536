"""MLflow Model Registry: log the model, register a version, move and restore aliases. Imports no
TensorFlow until a model is logged, so ``promote`` and ``recover`` start in seconds."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from contract import CHALLENGER, CHAMPION, IMAGE_SHAPE, NUM_CLASSES, SAVED_MODEL_ARTIFACT, SIGNATURE

if TYPE_CHECKING:  # Keras only where a model is logged: promote and recover start without TensorFlow
    import keras

MODEL_DESCRIPTION = (
    "Handwritten digit classifier (Keras CNN on MNIST). Each version is a keras-flavor MLflow model that also "
    f"carries the TensorFlow SavedModel under `{SAVED_MODEL_ARTIFACT}/`: signature `{SIGNATURE.name}` takes "
    f"`{SIGNATURE.input}` uint8 [N, {IMAGE_SHAPE[0]}, {IMAGE_SHAPE[1]}] and returns `{SIGNATURE.probabilities}` "
    f"float32 [N, {NUM_CLASSES}] and `{SIGNATURE.digit}` int64 [N]. The `{CHAMPION}` alias is what the prediction "
    f"service serves; it moves only when a training run passes the gate. `{CHALLENGER}` is the latest registered version."
)


def model_signature() -> ModelSignature:
    """The keras flavor's signature: raw 0-255 pixels as float32 ``[N, 28, 28, 1]``."""
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *IMAGE_SHAPE, 1), SIGNATURE.input)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_CLASSES), SIGNATURE.probabilities)]),
    )


def pip_requirements() -> list[str]:
    """What the keras flavor needs to load the model, pinned to this environment: the list MLflow would
    infer. Given explicitly, because inferring it starts a child process that imports TensorFlow and
    loads the model again, 13 of a 41 s training of the seed config on a small sample."""
    import keras
    import tensorflow as tf

    versions = {"mlflow": mlflow.__version__, "keras": keras.__version__, "numpy": np.__version__, "tensorflow": tf.__version__}
    return [f"{package}=={version}" for package, version in versions.items()]


def log_model(model: keras.Model, saved_model_dir: Path) -> mlflow.models.model.ModelInfo:
    """Log the keras flavor and attach the exported SavedModel under ``saved_model/``.

    No input example: ``mlflow.keras.log_model(input_example=...)`` crashes in MLflow 3.17 (issue 16183).
    """
    info = mlflow.keras.log_model(model, name="model", signature=model_signature(), pip_requirements=pip_requirements())
    MlflowClient().log_model_artifacts(info.model_id, str(saved_model_dir), artifact_path=SAVED_MODEL_ARTIFACT)
    return info


def register(model_uri: str, name: str, tags: dict[str, str], description: str) -> ModelVersion:
    """Register ``model_uri`` as a new version of ``name`` and point ``challenger`` at it."""
    client = MlflowClient()
    _describe_registered_model(client, name)
    # the client's call, not mlflow.register_model: that one prints "Registered model ... already exists"
    # on every training, the first included (the model was just created above, with its description)
    logged = model_uri.removeprefix("models:/")
    model_id = logged if model_uri.startswith("models:/m-") and "/" not in logged else None
    version = client.create_model_version(name, source=model_uri, tags=tags, description=description, model_id=model_id)
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    return client.get_model_version(name, version.version)


def _describe_registered_model(client: MlflowClient, name: str) -> None:
    """Create the registered model with its description, or describe one that has none."""
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name, description=MODEL_DESCRIPTION)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # another training created it just now
                raise
        return
    if not model.description:
        client.update_registered_model(name, description=MODEL_DESCRIPTION)


def describe_version(name: str, version: str, description: str) -> None:
    MlflowClient().update_model_version(name, version, description=description)


def current_champion(name: str) -> ModelVersion | None:
    """The version ``champion`` points at; None only when the model or the alias does not exist.

    Any other registry error (a 5xx, a timeout, a refused permission) propagates: inside the gate,
    reading it as "no champion" would promote a candidate on the accuracy floor alone.
    """
    version = alias_version(name, CHAMPION)
    return None if version is None else MlflowClient().get_model_version(name, version)


def alias_version(name: str, alias: str) -> str | None:
    """The version ``alias`` points at, None when the model or the alias does not exist.

    Read from the registered model's alias map: ``get_model_version_by_alias`` reports a missing alias
    as INVALID_PARAMETER_VALUE, the same code as a malformed request, and ``search_model_versions``
    returns versions without their aliases in MLflow 3.17's SQL store.
    """
    try:
        model = MlflowClient().get_registered_model(name)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = dict(model.aliases or {}).get(alias)
    return None if version is None else str(version)


def download_saved_model(model_uri: str, dst: Path | None = None) -> Path:
    """Fetch the SavedModel carried by a registered version (``models:/name@alias`` or ``models:/name/3``)."""
    dst = dst or Path(tempfile.mkdtemp(prefix="mnist-savedmodel-"))
    return Path(mlflow.artifacts.download_artifacts(f"{model_uri.rstrip('/')}/{SAVED_MODEL_ARTIFACT}", dst_path=str(dst)))


def promote(name: str, version: str | int, alias: str = CHAMPION) -> None:
    """Point ``alias`` at an existing ``version`` (an MLflow error names a version that does not exist)."""
    client = MlflowClient()
    client.get_model_version(name, str(version))
    client.set_registered_model_alias(name, alias, str(version))


def delete_version(name: str, version: str | int) -> None:
    """Undo a registration when the run fails after it (a failed run registers nothing)."""
    MlflowClient().delete_model_version(name, str(version))


def restore_champion(name: str, version: str | None) -> None:
    """Point ``champion`` back at ``version`` (or remove it when there was none)."""
    client = MlflowClient()
    if version is None:
        try:
            client.delete_registered_model_alias(name, CHAMPION)
        except MlflowException:
            pass
    else:
        client.set_registered_model_alias(name, CHAMPION, str(version))
