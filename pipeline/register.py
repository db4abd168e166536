"""MLflow Model Registry: log the model, register a version, and gate the ``champion`` alias.

The gate is a compare-and-set: the champion is read, scored, compared and moved while holding
:func:`gate_lock`, so two trainings finishing together cannot both beat the same stale champion.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

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


# -- the gate as a compare-and-set -----------------------------------------------------------------

LOCK_SUFFIX = "--gate-lock"
LOCK_STALE_S = 600.0  # a holder that has not finished its gate in 10 minutes is gone


def lock_name(name: str) -> str:
    return f"{name}{LOCK_SUFFIX}"


@contextmanager
def gate_lock(name: str, wait_s: float = 900.0, poll_s: float = 0.5) -> Iterator[None]:
    """Hold the gate of registered model ``name`` for this process.

    The lock is a registered model named ``<name>--gate-lock``: creating a registered model is atomic
    in every MLflow store (a unique name in the database), works over the tracking server's REST API
    with the trainer's own credentials, and shows in the UI who holds it. A lock older than
    :data:`LOCK_STALE_S` (its holder was killed) is broken; ``python -m pipeline recover`` does the same.
    """
    client, lock = MlflowClient(), lock_name(name)
    holder = f"{socket.gethostname()}:{os.getpid()}"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.create_registered_model(lock, tags={"holder": holder, "acquired_at": f"{time.time():.0f}"},
                                           description=f"held while a training run gates {name}; deleted after")
            break
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        if break_stale_lock(name):
            continue
        if time.monotonic() > deadline:
            raise TimeoutError(f"the gate of {name} is still held by another training after {wait_s:.0f}s "
                               f"(registered model {lock}); retry later or run `python -m pipeline recover`")
        time.sleep(poll_s)
    try:
        yield
    finally:
        client.delete_registered_model(lock)


def break_stale_lock(name: str, stale_s: float = LOCK_STALE_S) -> str | None:
    """Delete the gate lock when its holder took it more than ``stale_s`` ago; returns its holder."""
    client = MlflowClient()
    try:
        lock = client.get_registered_model(lock_name(name))
    except MlflowException:
        return None
    acquired = float(lock.tags.get("acquired_at", "0") or 0)
    if time.time() - acquired < stale_s:
        return None
    try:
        client.delete_registered_model(lock.name)
    except MlflowException:
        return None
    return lock.tags.get("holder", "unknown")


@dataclass(frozen=True)
class GateOutcome:
    decision: GateDecision
    previous_champion: str | None  # the champion version the decision was made against


def gate_and_promote(name: str, version: str, candidate_accuracy: float, floor: float,
                     champion_accuracy: Callable[[str], float], before_promote: Callable[[str | None], None] = lambda _: None,
                     ) -> GateOutcome:
    """Read the champion, score it, decide and move the alias, all under :func:`gate_lock`.

    ``champion_accuracy(version)`` scores a registered version on the candidate's test data;
    ``before_promote(previous)`` runs just before the alias moves (the job records ``previous`` in the
    run, so a crash between here and the end of the run can be undone by ``recover``).
    """
    with gate_lock(name):
        champion = current_champion(name)
        previous = str(champion.version) if champion is not None else None
        champion_score = champion_accuracy(previous) if previous is not None else None
        decision = decide(candidate_accuracy, champion_score, floor)
        if decision.promote:
            before_promote(previous)
            promote(name, version)
    return GateOutcome(decision, previous)
