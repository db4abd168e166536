"""The CNN, built from a :class:`ModelConfig`.

Input is raw pixels as float ``[N, 28, 28, 1]`` in 0-255; scaling (when configured) and augmentation
(active in training only) are layers of the model, so the exported graph needs no outside preprocessing.
"""

from __future__ import annotations

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
    if cfg.rescale:
        x = layers.Rescaling(1.0 / 255, name="rescale")(x)

    for i, block in enumerate(cfg.conv_blocks, start=1):
        for j in range(1, block.convs + 1):
            name = f"conv{i}_{j}"
            if cfg.batch_norm:
                x = layers.Conv2D(block.filters, block.kernel_size, padding="same", use_bias=False, name=name)(x)
                x = layers.BatchNormalization(name=f"{name}_bn")(x)
                x = layers.Activation("relu", name=f"{name}_relu")(x)
            else:
                x = layers.Conv2D(block.filters, block.kernel_size, padding="same", activation="relu", name=name)(x)
        x = layers.MaxPooling2D(2, name=f"pool{i}")(x)
        if cfg.conv_dropout:
            x = layers.Dropout(cfg.conv_dropout, name=f"pool{i}_dropout")(x)

    x = layers.GlobalAveragePooling2D(name="gap")(x) if cfg.global_pooling else layers.Flatten(name="flatten")(x)
    for k, units in enumerate(cfg.dense_units, start=1):
        x = layers.Dense(units, use_bias=not cfg.batch_norm, name=f"dense{k}")(x)
        if cfg.batch_norm:
            x = layers.BatchNormalization(name=f"dense{k}_bn")(x)
        x = layers.Activation("relu", name=f"dense{k}_relu")(x)
        if cfg.dense_dropout:
            x = layers.Dropout(cfg.dense_dropout, name=f"dense{k}_dropout")(x)
    outputs = layers.Dense(NUM_CLASSES, activation="softmax", name=SIGNATURE.probabilities)(x)
    return keras.Model(inputs, outputs, name="mnist_cnn")


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


def first_conv_layer(model: keras.Model) -> layers.Conv2D:
    return next(layer for layer in model.layers if isinstance(layer, layers.Conv2D))
