"""TensorFlow SavedModel export whose signature (``contract.SIGNATURE``) takes raw uint8 pixels.

Signature ``serving_default``: ``pixels`` uint8 ``[N, 28, 28]`` -> ``probabilities`` float32 ``[N, 10]``,
``digit`` int64 ``[N]``.
Everything between raw pixels and probabilities is inside the graph, so a TensorFlow Serving client
that sends raw pixels gets correct answers. Layout: ``<base>/mnist/<version>/saved_model.pb``.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from contract import IMAGE_SHAPE, SIGNATURE, servable_dir
from pipeline.errors import ExportError
from pipeline.model import model_input
from pipeline.tracking import process_started


def export_to_staging(model: keras.Model, export_base: Path) -> Path:
    """Write the SavedModel into a hidden staging directory under ``<base>/mnist``.

    TensorFlow Serving ignores directories whose names are not numbers, so a staged export is never
    picked up half-written; :func:`publish` renames it into place once it has a version number.
    """
    servable = servable_dir(export_base)
    servable.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    staging = servable / f".staging-{pid}-{process_started(pid):.0f}-{uuid.uuid4().hex[:8]}-{socket.gethostname()}"

    @tf.function(input_signature=[tf.TensorSpec([None, *IMAGE_SHAPE], tf.uint8, name=SIGNATURE.input)])
    def serve(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        probabilities = model(model_input(pixels), training=False)
        return {
            SIGNATURE.probabilities: tf.cast(probabilities, tf.float32),
            SIGNATURE.digit: tf.argmax(probabilities, axis=-1, output_type=tf.int64),
        }

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(SIGNATURE.name, serve)
    try:
        archive.write_out(str(staging), verbose=False)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def predict_savedmodel(path: Path, images: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Probabilities from a SavedModel's ``serving_default`` on uint8 ``[N, 28, 28]`` images."""
    serve = tf.saved_model.load(str(path)).signatures[SIGNATURE.name]
    chunks = [
        serve(**{SIGNATURE.input: tf.constant(images[start : start + batch_size], dtype=tf.uint8)})[
            SIGNATURE.probabilities
        ].numpy()
        for start in range(0, len(images), batch_size)
    ]
    return np.concatenate(chunks)


def verify_export(path: Path, model: keras.Model, images: np.ndarray, atol: float = 1e-4) -> None:
    """Reload the export and check it predicts what the in-memory model predicts."""
    exported = predict_savedmodel(path, images)
    expected = keras.ops.convert_to_numpy(model(model_input(images), training=False))
    if exported.shape != expected.shape or not np.allclose(exported, expected, atol=atol):
        worst = float(np.abs(exported - expected).max()) if exported.shape == expected.shape else float("nan")
        raise ExportError(f"exported SavedModel disagrees with the trained model (max |diff| {worst:.2e})")
    if not np.array_equal(exported.argmax(1), expected.argmax(1)):
        raise ExportError("exported SavedModel predicts different digits from the trained model")


def publish(staging: Path, version: int | str) -> Path:
    """Atomically rename a verified staging export to ``<base>/mnist/<version>``."""
    final = staging.parent / str(version)
    if final.exists():
        raise ExportError(f"export {final} already exists; refusing to overwrite it")
    staging.rename(final)
    return final


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def unpublish(path: Path) -> None:
    """Remove a published export again (the rollback when a later step of the commit fails)."""
    shutil.rmtree(path, ignore_errors=True)


def staging_owner(staging: Path) -> tuple[str, str, str] | None:
    """(host, pid, process start time) of the process that wrote a staging export, if its name says."""
    parts = staging.name.split("-", 4)
    if len(parts) != 5 or not parts[1].isdigit():
        return None
    return parts[4], parts[1], parts[2]
