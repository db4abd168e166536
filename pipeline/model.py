"""The CNN, built from a :class:`ModelConfig`.

Input is raw pixels as float ``[N, 28, 28, 1]`` in 0-255; scaling (when configured) and augmentation
(active in training only) are layers of the model, so the exported graph needs no outside preprocessing.
"""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import layers

from contract import IMAGE_SHAPE, NUM_CLASSES, SIGNATURE
from pipeline.config import ModelConfig, TrainingConfig


def model_input(pixels: Any) -> Any:
    """The signature's uint8 ``[N, 28, 28]`` pixels as the model's float32 ``[N, 28, 28, 1]``, still 0-255.

    The one conversion between the two: training, evaluation, the export's graph and its check all
    call this (NumPy arrays in, or tensors inside a ``tf.function``).
    """
    return keras.ops.expand_dims(keras.ops.cast(pixels, "float32"), -1)


def build_model(cfg: ModelConfig) -> keras.Model:
    inputs = keras.Input(shape=(*IMAGE_SHAPE, 1), name=SIGNATURE.input)
    x = inputs
    if cfg.augmentation is not None:
        aug = cfg.augmentation
        if aug.rotation:
            x = layers.RandomRotation(aug.rotation, fill_mode="constant", name="aug_rotation")(x)
        if aug.translation:
            x = layers.RandomTranslation(aug.translation, aug.translation, fill_mode="constant", name="aug_translation")(x)
        if aug.zoom:
            x = layers.RandomZoom(aug.zoom, fill_mode="constant", name="aug_zoom")(x)
        if aug.elastic:
            x = ElasticDistortion(aug.elastic.alpha, aug.elastic.sigma, name="aug_elastic")(x)
    if cfg.rescale:
        x = layers.Rescaling(1.0 / 255, name="rescale")(x)

    for i, block in enumerate(cfg.conv_blocks, start=1):
        for j in range(1, block.convs + 1):
            name = f"conv{i}_{j}"
            strides = block.strides if j == 1 else 1
            if cfg.batch_norm:
                x = layers.Conv2D(block.filters, block.kernel_size, strides, padding="same", use_bias=False, name=name)(x)
                x = layers.BatchNormalization(momentum=cfg.batch_norm_momentum, name=f"{name}_bn")(x)
                x = layers.Activation("relu", name=f"{name}_relu")(x)
            else:
                x = layers.Conv2D(block.filters, block.kernel_size, strides, padding="same", activation="relu", name=name)(x)
        if block.pool:
            x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
        if cfg.conv_dropout:
            x = layers.Dropout(cfg.conv_dropout, name=f"pool{i}_dropout")(x)

    x = layers.GlobalAveragePooling2D(name="gap")(x) if cfg.global_pooling else layers.Flatten(name="flatten")(x)
    for k, units in enumerate(cfg.dense_units, start=1):
        x = layers.Dense(units, use_bias=not cfg.batch_norm, name=f"dense{k}")(x)
        if cfg.batch_norm:
            x = layers.BatchNormalization(momentum=cfg.batch_norm_momentum, name=f"dense{k}_bn")(x)
        x = layers.Activation("relu", name=f"dense{k}_relu")(x)
        if cfg.dense_dropout:
            x = layers.Dropout(cfg.dense_dropout, name=f"dense{k}_dropout")(x)
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", name=SIGNATURE.probabilities)(x)
    return keras.Model(inputs, outputs, name="mnist_cnn")


@keras.saving.register_keras_serializable(package="pipeline")
class ElasticDistortion(layers.Layer):
    """Elastic distortion of a batch of ``[N, H, W, C]`` images, in training only (Simard, Steinkraus &
    Platt, "Best practices for convolutional neural networks applied to visual document analysis", 2003).

    Each image gets its own displacement field: uniform noise in [-1, 1] per pixel and axis, smoothed by
    a Gaussian of standard deviation ``sigma`` pixels and scaled by ``alpha`` pixels; every pixel is then
    read, bilinearly, from its displaced position (zero outside the image, MNIST's background). It is a
    layer of the model like Keras's random rotation or zoom, so it runs inside the training graph, on
    each batch, and is the identity at inference.
    """

    def __init__(self, alpha: float, sigma: float, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.alpha, self.sigma, self.seed = float(alpha), float(sigma), seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        radius = max(1, math.ceil(3 * self.sigma))
        taps = keras.ops.exp(-0.5 * (keras.ops.arange(-radius, radius + 1, dtype="float32") / self.sigma) ** 2)
        self._taps = taps / keras.ops.sum(taps)

    def call(self, images: Any, training: bool | None = None) -> Any:
        if not training:
            return images
        shape = keras.ops.shape(images)
        batch, height, width = shape[0], shape[1], shape[2]
        noise = keras.random.uniform((batch, height, width, 2), -1.0, 1.0, seed=self.seed_generator)
        taps = keras.ops.cast(self._taps, noise.dtype)
        size = keras.ops.shape(taps)[0]
        # a separable Gaussian: one depthwise pass down the columns, one along the rows
        field = keras.ops.depthwise_conv(
            noise, keras.ops.tile(keras.ops.reshape(taps, (size, 1, 1, 1)), (1, 1, 2, 1)), padding="same"
        )
        field = keras.ops.depthwise_conv(
            field, keras.ops.tile(keras.ops.reshape(taps, (1, size, 1, 1)), (1, 1, 2, 1)), padding="same"
        )
        field = field * self.alpha
        rows = keras.ops.cast(keras.ops.arange(height), noise.dtype)[None, :, None] + field[..., 0]
        cols = keras.ops.cast(keras.ops.arange(width), noise.dtype)[None, None, :] + field[..., 1]
        return _bilinear(images, rows, cols)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "alpha": self.alpha, "sigma": self.sigma, "seed": self.seed}


def _bilinear(images: Any, rows: Any, cols: Any) -> Any:
    """``images[n, rows[n, i, j], cols[n, i, j], :]`` read bilinearly at fractional positions, zero outside."""
    shape = keras.ops.shape(images)
    batch, height, width, channels = shape[0], shape[1], shape[2], shape[3]
    flat = keras.ops.reshape(images, (-1, channels))
    base = (keras.ops.arange(batch) * height * width)[:, None, None]
    top, left = keras.ops.floor(rows), keras.ops.floor(cols)
    out = 0.0
    for r, weight_r in ((top, 1.0 - (rows - top)), (top + 1.0, rows - top)):
        for c, weight_c in ((left, 1.0 - (cols - left)), (left + 1.0, cols - left)):
            inside = (r >= 0) & (r <= keras.ops.cast(height - 1, r.dtype)) & (c >= 0) & (c <= keras.ops.cast(width - 1, c.dtype))
            ri = keras.ops.clip(keras.ops.cast(r, "int32"), 0, height - 1)
            ci = keras.ops.clip(keras.ops.cast(c, "int32"), 0, width - 1)
            values = keras.ops.take(flat, keras.ops.reshape(base + ri * width + ci, (-1,)), axis=0)
            weight = keras.ops.where(inside, weight_r * weight_c, 0.0)
            out = out + keras.ops.reshape(values, shape) * weight[..., None]
    return out


def make_optimizer(cfg: TrainingConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule = cfg.learning_rate
    if cfg.lr_schedule == "cosine":
        warmup = cfg.warmup_epochs * steps_per_epoch
        learning_rate = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if warmup else cfg.learning_rate,
            decay_steps=max(1, (cfg.epochs - cfg.warmup_epochs) * steps_per_epoch),
            warmup_target=cfg.learning_rate if warmup else None,
            warmup_steps=warmup,
        )
    optimizers = {"rmsprop": keras.optimizers.RMSprop, "adam": keras.optimizers.Adam, "sgd": keras.optimizers.SGD}
    return optimizers[cfg.optimizer](learning_rate=learning_rate)


def compile_model(model: keras.Model, cfg: TrainingConfig, steps_per_epoch: int) -> None:
    model.compile(
        optimizer=make_optimizer(cfg, steps_per_epoch),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
        metrics=["accuracy"],
    )


TRAINING_ONLY = (
    layers.Dropout,
    layers.RandomRotation,
    layers.RandomTranslation,
    layers.RandomZoom,
    ElasticDistortion,
)


def layer_chain(model: keras.Model) -> list[layers.Layer]:
    """The model's layers in order, checked to be a chain (each takes the previous one's output), as every
    model :func:`build_model` makes is; the export's folding and :func:`recalibrate_batch_norm` rely on it."""
    chain = [layer for layer in model.layers if not isinstance(layer, layers.InputLayer)]
    inputs_expected = [model.inputs[0], *(layer.output for layer in chain[:-1])]
    if any(layer.input is not expected for layer, expected in zip(chain, inputs_expected, strict=True)):
        raise ValueError(f"model {model.name} is not a chain of layers")
    return chain


def recalibrate_batch_norm(model: keras.Model, pixels: Any, batch_size: int = 1024) -> int:
    """Re-estimate every BatchNormalization's moving mean and variance on clean images with the final
    weights; returns how many layers it updated.

    During training the moving statistics trail the weights (an exponential average over the last
    steps) and see augmented images; inference sees clean ones. Here they become the plain average of
    each batch's statistics over ``pixels`` (uint8 ``[N, 28, 28]``), in inference mode for every other
    layer: no augmentation, no dropout.
    """
    chain = layer_chain(model)
    norms = [layer for layer in chain if isinstance(layer, layers.BatchNormalization)]
    if not norms:
        return 0
    momenta = [norm.momentum for norm in norms]
    try:
        for k, start in enumerate(range(0, len(pixels), batch_size)):
            for norm in norms:
                norm.momentum = k / (k + 1)  # after batch k, the mean of batches 0..k
            x = model_input(pixels[start : start + batch_size])
            for layer in chain:
                if not isinstance(layer, TRAINING_ONLY):
                    x = layer(x, training=isinstance(layer, layers.BatchNormalization))
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
    return len(norms)


def first_conv_layer(model: keras.Model) -> layers.Conv2D:
    return next(layer for layer in model.layers if isinstance(layer, layers.Conv2D))
