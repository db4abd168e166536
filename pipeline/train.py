"""Fit the model: seeds, device strategy, callbacks and per-epoch MLflow metrics."""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass

import keras
import mlflow
import numpy as np
import tensorflow as tf

from pipeline.config import PipelineConfig, TrainingConfig
from pipeline.data import Splits
from pipeline.model import build_model, compile_model


@dataclass
class TrainResult:
    model: keras.Model
    history: dict[str, list[float]]
    wall_time_s: float
    epochs_run: int
    replicas: int


def as_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 ``[N, 28, 28]`` -> float32 ``[N, 28, 28, 1]`` raw 0-255 values (the model scales, if at all)."""
    return images.astype(np.float32)[..., None]


def _dataset(images: np.ndarray, labels: np.ndarray, batch_size: int, shuffle_seed: int | None = None) -> tf.data.Dataset:
    """Batches of (raw-pixel float images, one-hot labels), reshuffled every epoch when seeded."""
    dataset = tf.data.Dataset.from_tensor_slices((as_model_input(images), keras.utils.to_categorical(labels, 10)))
    if shuffle_seed is not None:
        dataset = dataset.shuffle(len(images), seed=shuffle_seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def configure_devices(cfg: TrainingConfig) -> None:
    """Thread pools and logical CPU devices; must run before TensorFlow touches a device."""
    if cfg.inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(cfg.inter_op_threads)
    if cfg.logical_cpus > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(cfg.logical_cpus)]
        )


def make_strategy(cfg: TrainingConfig) -> tf.distribute.Strategy:
    if cfg.strategy == "mirrored":
        if tf.config.list_logical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        cpus = [device.name for device in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=cpus)
    return tf.distribute.get_strategy()


class MlflowEpochLogger(keras.callbacks.Callback):
    """Logs loss, accuracy, val_loss, val_accuracy and the learning rate with step = epoch."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        metrics = {key: float(value) for key, value in (logs or {}).items()}
        metrics["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        mlflow.log_metrics(metrics, step=epoch)


class StopOnSignal(keras.callbacks.Callback):
    """Ctrl-C (SIGINT) or SIGTERM during ``fit`` stops training after the current batch, then raises
    KeyboardInterrupt from Python code.

    Left to Python's default handler, the KeyboardInterrupt lands wherever the main thread happens to
    be, often inside TensorFlow's native code. The process then sometimes died in glibc's malloc on its
    way out (exit -6, seen in 2 of 3 runs of the Ctrl-C test on this machine) instead of marking the
    run FAILED.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        super().__init__()
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, _frame: object) -> None:
        self.received = signum
        self.model.stop_training = True

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.received is not None:
            self.model.stop_training = True

    def on_train_end(self, logs: dict | None = None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self.received is not None:
            raise KeyboardInterrupt(f"training stopped by {signal.Signals(self.received).name}")


def train(cfg: PipelineConfig, splits: Splits) -> TrainResult:
    keras.utils.set_random_seed(cfg.seed)
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    tcfg = cfg.training
    strategy = make_strategy(tcfg)
    steps_per_epoch = int(np.ceil(len(splits.x_train) / tcfg.batch_size))
    with strategy.scope():
        model = build_model(cfg.model)
        compile_model(model, tcfg, steps_per_epoch)

    callbacks: list[keras.callbacks.Callback] = [MlflowEpochLogger(), StopOnSignal()]
    if tcfg.early_stopping_patience:
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=tcfg.early_stopping_patience, restore_best_weights=True, verbose=1,
        ))
    if tcfg.lr_schedule == "plateau":
        callbacks.append(keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.3, patience=2, verbose=1))

    started = time.perf_counter()
    history = model.fit(
        _dataset(splits.x_train, splits.y_train, tcfg.batch_size, shuffle_seed=cfg.seed),
        validation_data=_dataset(splits.x_val, splits.y_val, tcfg.batch_size),
        epochs=tcfg.epochs,
        callbacks=callbacks,
        verbose=1 if sys.stdout.isatty() else 2,
    )
    wall_time = time.perf_counter() - started
    return TrainResult(model, history.history, wall_time, len(history.epoch), strategy.num_replicas_in_sync)
