"""TensorFlow SavedModel export whose signature (``contract.SIGNATURE``) takes raw uint8 pixels.

Signature ``serving_default``: ``pixels`` uint8 ``[N, 28, 28]`` -> ``probabilities`` float32 ``[N, 10]``,
``digit`` int64 ``[N]``.
Everything between raw pixels and probabilities is inside the graph, so a TensorFlow Serving client
that sends raw pixels gets correct answers. Layout: ``<base>/mnist/<version>/saved_model.pb`` (:mod:`pipeline.publish`).

The exported graph is the inference model: batch normalization folded into the conv or dense layer
before it, training-only layers (augmentation, dropout) left out. Keras 3 runs an inference-mode
BatchNormalization as separate element-wise ops on every feature map; folded, it costs nothing. The
export is checked against the trained, unfolded model before it is published (:func:`verify_export`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from contract import IMAGE_SHAPE, SIGNATURE
from pipeline.errors import ExportError
from pipeline.model import TRAINING_ONLY, layer_chain, model_input
from pipeline.publish import new_staging


def fold_batch_norm(model: keras.Model) -> keras.Model:
    """The same function as ``model`` at inference, with every BatchNormalization that follows a Conv2D
    or Dense folded into that layer's kernel and bias, and training-only layers dropped.

    BN computes ``gamma * (y - mean) / sqrt(var + eps) + beta`` on ``y = x @ W + b``; with
    ``s = gamma / sqrt(var + eps)`` that is ``x @ (W * s) + ((b - mean) * s + beta)``. The model must be
    a chain of layers (every model :func:`pipeline.model.build_model` makes is one). A model without
    BatchNormalization is returned as it is.
    """
    if not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers):
        return model
    try:
        chain = layer_chain(model)
    except ValueError as exc:
        raise ExportError(f"cannot fold batch normalization: {exc}") from None
    chain = [layer for layer in chain if not isinstance(layer, TRAINING_ONLY)]
    inputs = keras.Input(shape=model.input_shape[1:], name=model.inputs[0].name)
    x, i = inputs, 0
    while i < len(chain):
        layer = chain[i]
        following = chain[i + 1] if i + 1 < len(chain) else None
        if isinstance(layer, keras.layers.Conv2D | keras.layers.Dense) and isinstance(following, keras.layers.BatchNormalization):
            if following.axis not in (-1, len(following.input.shape) - 1):
                raise ExportError(f"cannot fold {following.name}: it normalizes axis {following.axis}, not the channels")
            folded = layer.__class__.from_config({**layer.get_config(), "use_bias": True})
            x = folded(x)
            folded.set_weights(_folded_weights(layer, following))
            i += 2
        else:
            copy = layer.__class__.from_config(layer.get_config())
            x = copy(x)
            copy.set_weights(layer.get_weights())
            i += 1
    return keras.Model(inputs, x, name=f"{model.name}_folded")


def _folded_weights(layer: keras.layers.Layer, bn: keras.layers.BatchNormalization) -> list[np.ndarray]:
    kernel = keras.ops.convert_to_numpy(layer.kernel).astype(np.float64)
    bias = keras.ops.convert_to_numpy(layer.bias).astype(np.float64) if layer.use_bias else 0.0
    mean = keras.ops.convert_to_numpy(bn.moving_mean).astype(np.float64)
    variance = keras.ops.convert_to_numpy(bn.moving_variance).astype(np.float64)
    gamma = keras.ops.convert_to_numpy(bn.gamma).astype(np.float64) if bn.scale else 1.0
    beta = keras.ops.convert_to_numpy(bn.beta).astype(np.float64) if bn.center else 0.0
    scale = gamma / np.sqrt(variance + bn.epsilon)
    return [(kernel * scale).astype(np.float32), ((bias - mean) * scale + beta).astype(np.float32)]


def export_to_staging(model: keras.Model, export_base: Path, fold: bool = True) -> Path:
    """Write the inference model (:func:`fold_batch_norm`) as a SavedModel into a hidden staging
    directory under ``<base>/mnist``.

    TensorFlow Serving ignores directories whose names are not numbers, so a staged export is never
    picked up half-written; :func:`pipeline.publish.publish` renames it into place once it has a
    version number.
    """
    staging = new_staging(export_base)

    inference = fold_batch_norm(model) if fold else model  # fold=False: for comparisons (scripts/benchmark_models.py)

    @tf.function(input_signature=[tf.TensorSpec([None, *IMAGE_SHAPE], tf.uint8, name=SIGNATURE.input)])
    def serve(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        probabilities = inference(model_input(pixels), training=False)
        return {
            SIGNATURE.probabilities: tf.cast(probabilities, tf.float32),
            SIGNATURE.digit: tf.argmax(probabilities, axis=-1, output_type=tf.int64),
        }

    archive = keras.export.ExportArchive()
    archive.track(inference)
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
    """Reload the export and check it predicts what the trained (unfolded) model predicts: the same
    digit for every image, and probabilities within ``atol``.

    Folding reorders float32 arithmetic (a product of the kernel and the BN scale instead of one after
    the other), which moves probabilities by about 1e-6; 1e-4 leaves room for that across ten layers
    and is still far below any change that matters to a client, who reads the digit and probabilities
    to a few decimals. A real folding mistake moves them by orders of magnitude more."""
    exported = predict_savedmodel(path, images)
    expected = keras.ops.convert_to_numpy(model(model_input(images), training=False))
    if exported.shape != expected.shape or not np.allclose(exported, expected, atol=atol):
        worst = float(np.abs(exported - expected).max()) if exported.shape == expected.shape else float("nan")
        raise ExportError(f"exported SavedModel disagrees with the trained model (max |diff| {worst:.2e})")
    if not np.array_equal(exported.argmax(1), expected.argmax(1)):
        raise ExportError("exported SavedModel predicts different digits from the trained model")
