"""Fit the model: seeds, device strategy, callbacks and per-epoch MLflow metrics."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import keras
import mlflow
import mlflow.keras
import numpy as np
import tensorflow as tf

from contract import NUM_CLASSES
from pipeline import distributed, keras_patches
from pipeline.config import PipelineConfig, TrainingConfig
from pipeline.data import Splits
from pipeline.model import build_model, compile_model, model_input, recalibrate_batch_norm
from pipeline.stop import SIGNALS, Stopped


@dataclass
class TrainResult:
    model: keras.Model
    history: dict[str, list[float]]
    wall_time_s: float
    epochs_run: int
    replicas: int


def _dataset(
    images: np.ndarray, labels: np.ndarray, batch_size: int, shuffle_seed: int | None = None, targets: np.ndarray | None = None
) -> tf.data.Dataset:
    """Batches of (raw-pixel float images, one-hot labels or the given target distributions), reshuffled
    every epoch when seeded."""
    targets = keras.utils.to_categorical(labels, NUM_CLASSES) if targets is None else targets
    dataset = tf.data.Dataset.from_tensor_slices((model_input(images), targets))
    if shuffle_seed is not None:
        dataset = dataset.shuffle(len(images), seed=shuffle_seed, reshuffle_each_iteration=True)
    options = tf.data.Options()  # several workers: each takes its share of every batch (in memory, not files)
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE).with_options(options)


def configure_devices(cfg: TrainingConfig) -> None:
    """Thread pools and logical CPU devices; must run before TensorFlow touches a device."""
    if cfg.inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(cfg.inter_op_threads)
    if cfg.logical_cpus > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(cfg.logical_cpus)])


def make_strategy(cfg: TrainingConfig) -> tf.distribute.Strategy:
    if cfg.strategy == "mirrored":
        if tf.config.list_logical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        cpus = [device.name for device in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices=cpus)
    if cfg.strategy == "multi_worker":
        return distributed.multi_worker_strategy()
    return tf.distribute.get_strategy()


class MlflowMetrics(mlflow.keras.MlflowCallback):
    """MLflow's Keras callback (optimizer params, model summary, per-epoch metrics), plus what it lacks.

    MLflow's logs either every epoch or every n steps; this logs both: the epoch metrics with the
    learning rate (step = epoch), and the training loss and accuracy every ``log_every_n_steps`` batches
    as ``batch_loss``/``batch_accuracy`` (step = batch number), so a long epoch shows progress in the UI.
    Validation metrics are the epoch's ``val_*``; MLflow's extra ``validation_*`` copies (logged without
    a step) are left out.
    """

    def __init__(self, log_every_n_steps: int = 50) -> None:
        super().__init__(log_every_epoch=True)
        self.every = log_every_n_steps

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        learning_rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        super().on_epoch_end(epoch, {**(logs or {}), "learning_rate": learning_rate})

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        step = int(self.model.optimizer.iterations.numpy())
        if logs and step % self.every == 0:
            mlflow.log_metrics({f"batch_{key}": float(value) for key, value in logs.items()}, step=step, synchronous=False)

    def on_test_end(self, logs: dict | None = None) -> None:
        pass

    def on_train_end(self, logs: dict | None = None) -> None:
        mlflow.flush_async_logging()


class EpochProgress(keras.callbacks.Callback):
    """One line per epoch: its metrics, how long it took and the ETA of the whole run. On a terminal,
    a counter of the batches also ticks within the epoch (Keras's own progress bar is off: it printed its
    epoch line apart from this one, and none that a log file could use)."""

    def __init__(self, epochs: int, steps_per_epoch: int, say: Callable[[str], None] = print, live: bool | None = None) -> None:
        super().__init__()
        self.epochs, self.steps, self.say = epochs, steps_per_epoch, say
        self.live = sys.stdout.isatty() if live is None else live
        self.started = self._last_tick = time.perf_counter()
        self._epoch = 0

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        now = time.perf_counter()
        if self.live and now - self._last_tick > 0.5:
            self._last_tick = now
            loss = (logs or {}).get("loss")
            sys.stdout.write(
                f"\repoch {self._epoch + 1}/{self.epochs}: batch {batch + 1}/{self.steps}"
                + (f", loss {loss:.4f}" if loss is not None else "")
                + "\x1b[K"
            )
            sys.stdout.flush()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.live:
            sys.stdout.write("\r\x1b[K")
        done = epoch + 1
        elapsed = time.perf_counter() - self.started
        left = elapsed / done * (self.epochs - done)
        metrics = " ".join(f"{key} {float(value):.4f}" for key, value in (logs or {}).items() if key != "learning_rate")
        self.say(
            f"epoch {done}/{self.epochs}: {metrics} | {elapsed / done:.1f}s per epoch, "
            f"{duration(elapsed)} elapsed, ETA {duration(left)}"
        )


def duration(seconds: float) -> str:
    """``42s``, ``3m05s`` or ``1h02m``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class RecalibrateBeforeValidation(keras.callbacks.Callback):
    """Re-estimate the batch norm statistics on a few clean training images before each validation, so
    each epoch's ``val_accuracy`` (what the pruner of a search judges) is the model's, not that of
    moving averages that trail it: a few thousand images train in so few steps that those averages
    were still near their initial values, and the trials scored at chance (0.10-0.19)."""

    def __init__(self, pixels: np.ndarray) -> None:
        super().__init__()
        self.pixels = pixels

    def on_test_begin(self, logs: dict | None = None) -> None:
        recalibrate_batch_norm(self.model, self.pixels)


class StopOnSignal(keras.callbacks.Callback):
    """Ctrl-C (SIGINT) or SIGTERM during ``fit`` stops training after the current batch, then raises
    :class:`~pipeline.stop.Stopped` from Python code.

    Left to Python's default handler, the KeyboardInterrupt lands wherever the main thread happens to
    be, often inside TensorFlow's native code. The process then sometimes died in glibc's malloc on its
    way out (exit -6, seen in 2 of 3 runs of the Ctrl-C test on this machine) instead of marking the
    run FAILED.
    """

    def __init__(self) -> None:
        super().__init__()
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, _frame: object) -> None:
        self.received = signum
        self.model.stop_training = True

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if self.received is not None:
            self.model.stop_training = True

    def on_train_end(self, logs: dict | None = None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self.received is not None:
            raise Stopped(self.received, "training stopped")


def train(
    cfg: PipelineConfig,
    splits: Splits,
    say: Callable[[str], None] = print,
    extra_callbacks: Sequence[keras.callbacks.Callback] = (),
    role: distributed.Role | None = None,
) -> TrainResult:
    """Fit ``cfg``'s model on ``splits`` as this process's ``role`` (by default, the one its strategy
    and ``TF_CONFIG`` give): alone or as a cluster's chief,
    inside the active MLflow run (per-epoch metrics go there); as another task of the cluster, nothing
    goes to MLflow. ``extra_callbacks`` run with the job's own (a hyperparameter search passes its pruner)."""
    keras.utils.set_random_seed(cfg.seed)
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    tcfg = cfg.training
    role = role or distributed.role_for(tcfg.strategy)
    strategy = make_strategy(tcfg)
    steps_per_epoch = int(np.ceil(len(splits.x_train) / tcfg.batch_size))
    with strategy.scope():
        model = build_model(cfg.model)
        compile_model(model, tcfg, steps_per_epoch)
    track, multi_worker = role.is_chief, role.multi_worker
    if multi_worker:
        sample = (model_input(splits.x_train[:1]), keras.utils.to_categorical(splits.y_train[:1], NUM_CLASSES))
        keras_patches.build_for_fit(model, sample)

    callbacks: list[keras.callbacks.Callback] = [
        *([MlflowMetrics(tcfg.log_every_n_steps)] if track else []),
        EpochProgress(tcfg.epochs, steps_per_epoch, say),
        *extra_callbacks,
        StopOnSignal(),
    ]
    if tcfg.early_stopping_patience:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor="val_loss",
                patience=tcfg.early_stopping_patience,
                restore_best_weights=True,
                verbose=1,
            )
        )
    if tcfg.recalibrate_images and cfg.model.batch_norm and not multi_worker:
        callbacks.append(RecalibrateBeforeValidation(splits.x_train[: min(2048, tcfg.recalibrate_images)]))
    if tcfg.lr_schedule == "plateau":
        callbacks.append(keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.3, patience=2, verbose=1))

    targets = None
    if tcfg.teacher is not None:
        targets, version = distillation_targets(
            cfg.registry.model_name, tcfg.teacher, splits.x_train, splits.y_train, tcfg.distill_temperature, tcfg.distill_weight
        )
        if track:
            mlflow.set_tag("distill_teacher", f"{cfg.registry.model_name}/{version}")
        say(
            f"distillation: targets are {tcfg.distill_weight:g} x teacher {cfg.registry.model_name} version {version} "
            f"({tcfg.teacher}) at temperature {tcfg.distill_temperature:g} + {1 - tcfg.distill_weight:g} x labels"
        )
    started = time.perf_counter()
    try:
        history = model.fit(
            _dataset(splits.x_train, splits.y_train, tcfg.batch_size, shuffle_seed=cfg.seed, targets=targets),
            validation_data=_dataset(splits.x_val, splits.y_val, tcfg.batch_size),
            epochs=tcfg.epochs,
            shuffle=False,  # the dataset reshuffles itself every epoch; Keras cannot shuffle a tf.data.Dataset
            callbacks=callbacks,
            verbose=0,  # EpochProgress reports
        )
    except distributed.cluster_errors() as exc:
        if not multi_worker:
            raise
        raise distributed.WorkerFailed(distributed.describe_failure(exc, "during training")) from None
    if multi_worker:
        model = _local_copy(cfg, model)
    if tcfg.recalibrate_images and recalibrate_batch_norm(model, splits.x_train[: tcfg.recalibrate_images]):
        say(f"batch norm statistics re-estimated on {min(len(splits.x_train), tcfg.recalibrate_images):,} clean training images")
    wall_time = time.perf_counter() - started
    return TrainResult(model, history.history, wall_time, len(history.epoch), strategy.num_replicas_in_sync)


def distillation_targets(
    name: str, teacher: str, images: np.ndarray, labels: np.ndarray, temperature: float, weight: float
) -> tuple[np.ndarray, str]:
    """Soft targets for knowledge distillation (Hinton, Vinyals & Dean 2015): the registered teacher's
    probabilities on the (clean) training images, softened at ``temperature`` (``p ** (1/T)``,
    renormalised: the softmax of its logits over T), mixed ``weight : 1 - weight`` with the one-hot
    labels. The student's cross-entropy against them is the usual distillation loss up to a constant.
    The teacher (an alias or a version number of ``name``) is read through its exported SavedModel, so
    any registered version can teach; returns the targets and the version that taught."""
    import tempfile
    from pathlib import Path

    from contract import registry_uri
    from pipeline.errors import ConfigError
    from pipeline.export import predict_savedmodel
    from pipeline.register import alias_version, download_saved_model

    version = teacher if teacher.isdigit() else alias_version(name, teacher)
    if version is None:
        raise ConfigError(f"training.teacher {teacher!r}: {name} has no version with that alias (train a teacher first)")
    uri = registry_uri(name, version)
    try:
        with tempfile.TemporaryDirectory(prefix="mnist-teacher-") as tmp:
            probabilities = predict_savedmodel(download_saved_model(uri, Path(tmp)), images).astype(np.float64)
    except mlflow.exceptions.MlflowException as exc:
        raise ConfigError(f"training.teacher {teacher!r}: cannot load {uri}: {exc.message}") from None
    softened = np.clip(probabilities, 1e-12, 1.0) ** (1.0 / temperature)
    softened /= softened.sum(axis=1, keepdims=True)
    targets = weight * softened + (1 - weight) * keras.utils.to_categorical(labels, NUM_CLASSES)
    return targets.astype(np.float32), version


def _local_copy(cfg: PipelineConfig, model: keras.Model) -> keras.Model:
    """The trained weights in a model of this process alone. The chief evaluates, plots and exports
    on its own; the multi-worker model would involve the other workers in every call."""
    local = build_model(cfg.model)
    local.set_weights(model.get_weights())
    return local
