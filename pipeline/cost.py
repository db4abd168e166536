"""What a trained model costs to serve: milliseconds per image through its exported signature, its
parameters and its FLOPs.

The time is measured the way the service calls the model: the exported SavedModel's signature, uint8
pixels, batches of 256 (the size bulk requests and busy batchers reach), the median of several calls
after warm-up. It is a figure for this machine and its load at that moment: compare trials measured
on the same machine, and do not run other work beside a sweep whose costs you want to trust.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from contract import IMAGE_SHAPE, SIGNATURE
from pipeline.export import export_to_staging

BATCH = 256


@dataclass(frozen=True)
class ServingCost:
    ms_per_image: float  # median model call at batch 256, divided by 256
    parameters: int
    flops: int  # multiply-adds x 2 of the conv and dense layers, per image

    def metrics(self) -> dict[str, float]:
        return {"ms_per_image": self.ms_per_image, "parameters": self.parameters, "flops": self.flops}


def serving_cost(model: keras.Model, images: np.ndarray, repeats: int = 7, warmup: int = 3) -> ServingCost:
    """Export ``model``, load the export as the service does and time its signature on ``images``
    (tiled to a batch of 256)."""
    workdir = Path(tempfile.mkdtemp(prefix="mnist-cost-"))
    try:
        ms = ms_per_image(export_to_staging(model, workdir), images, repeats, warmup)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return ServingCost(ms, model.count_params(), flops(model))


def ms_per_image(saved_model: Path, images: np.ndarray, repeats: int = 7, warmup: int = 3) -> float:
    """Median milliseconds per image of an exported SavedModel's signature at batch 256."""
    serve = tf.saved_model.load(str(saved_model)).signatures[SIGNATURE.name]
    pixels = np.resize(images, (BATCH, *IMAGE_SHAPE)).astype(np.uint8)
    return 1000 / images_per_s(serve, pixels, repeats, warmup)


def images_per_s(serve: Any, pixels: np.ndarray, repeats: int = 7, warmup: int = 3) -> float:
    """Images per second through a signature function called on all of ``pixels`` at once: the median
    of ``repeats`` calls after ``warmup`` untimed ones."""
    tensor = tf.constant(pixels)
    for _ in range(warmup):
        serve(**{SIGNATURE.input: tensor})
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        serve(**{SIGNATURE.input: tensor})[SIGNATURE.probabilities].numpy()
        seconds.append(time.perf_counter() - started)
    return len(pixels) / statistics.median(seconds)


def flops(model: keras.Model) -> int:
    """Floating-point operations per image of the conv and dense layers (2 x multiply-adds); pooling,
    normalisation and activations add little and are left out."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, height, width, channels_out = layer.output.shape
            kernel_h, kernel_w, channels_in, _ = layer.kernel.shape
            total += 2 * height * width * kernel_h * kernel_w * channels_in * channels_out
        elif isinstance(layer, keras.layers.Dense):
            units_in, units_out = layer.kernel.shape
            total += 2 * units_in * units_out
    return int(total)
