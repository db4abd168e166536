"""The training job: data -> model -> train -> evaluate -> export -> register -> publish -> gate, in one MLflow run.

A run that fails or is stopped at any step is marked FAILED, registers nothing and leaves no export
behind; once the commit (register ... finish the run) has begun, it completes or rolls back as a whole.
What a killed process leaves, the next ``train`` (or ``python -m pipeline recover``) cleans up.
"""

from __future__ import annotations

import io
import os
import tempfile
import time
import warnings
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras
import mlflow
import numpy as np

from pipeline import data as data_module
from pipeline import evaluate, export, recover, register, tracking
from pipeline.config import PipelineConfig
from pipeline.stop import StopSignals
from pipeline.train import TrainResult, as_model_input, configure_devices, train

KERAS_MNIST_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
VERIFY_BATCH = 512


@dataclass(frozen=True)
class JobResult:
    run_id: str
    model_version: str
    test_accuracy: float
    promoted: bool
    export_path: str
    decision: register.GateDecision
    train_wall_time_s: float
    epochs_run: int
    train_images: int


def run_training(cfg: PipelineConfig, data_spec: data_module.DataSpec, say: Callable[[str], None] = print,
                 stop: StopSignals | None = None) -> JobResult:
    """The whole job in one MLflow run. ``stop`` (installed by the CLI) keeps signals out of the commit."""
    stop = stop or StopSignals()
    configure_devices(cfg.training)
    tracking.setup(cfg.registry.experiment, say)
    recover.recover(cfg.registry.model_name, cfg.registry.experiment, Path(cfg.export.base_dir), say=say)
    run = mlflow.start_run(run_name=cfg.name, tags=tracking.liveness_tags())
    run_id = run.info.run_id
    try:
        with tracking.Heartbeat(run_id):
            say(f"MLflow run {run_id} ({tracking.tracking_uri()})")
            mlflow.set_tags({"config": cfg.name, "git_commit": tracking.git_commit(), "data_source": data_spec.describe()})
            mlflow.log_params(cfg.flat())

            _step(say, "data")
            data = data_module.load(data_spec)
            say(f"data: {data_spec.describe()} train={len(data.x_train)} test={len(data.x_test)} digest={data.digest}")
            _log_dataset(data)
            splits = data.split(cfg.data.validation_split, cfg.seed)

            _step(say, "train")
            result = train(cfg, splits)
            say(f"trained {result.epochs_run} epochs on {result.replicas} replica(s) in {result.wall_time_s:.1f}s")
            mlflow.set_tag("replicas", str(result.replicas))
            mlflow.set_tag("training_wall_time_s", f"{result.wall_time_s:.1f}")
            mlflow.log_metrics({"training_wall_time_s": result.wall_time_s, "epochs_run": result.epochs_run})

            _step(say, "evaluate")
            probabilities = keras.ops.convert_to_numpy(result.model.predict(as_model_input(splits.x_test), batch_size=1024, verbose=0))
            evaluation = evaluate.evaluate_probabilities(probabilities, splits.y_test)
            mlflow.log_metrics(evaluation.metrics())
            say(f"test accuracy {evaluation.accuracy:.4f}, test loss {evaluation.loss:.4f}, training {result.wall_time_s:.1f}s")
            _log_artifacts(result.model, result.history, evaluation, splits.x_test)

            return _export_and_commit(cfg, result, evaluation, splits, run_id, say, stop)
    except BaseException:
        mlflow.end_run("FAILED")
        raise


def _step(say: Callable[[str], None], name: str) -> None:
    """Announce a step of the job. For fault drills and tests, ``PIPELINE_PAUSE_AT=<step>`` pauses
    there for ``PIPELINE_PAUSE_S`` seconds (10), so a signal or a kill can land at a known step."""
    say(f"step: {name}")
    if os.environ.get("PIPELINE_PAUSE_AT") == name:
        time.sleep(float(os.environ.get("PIPELINE_PAUSE_S") or 10))


def _export_and_commit(cfg: PipelineConfig, result: TrainResult, evaluation: evaluate.Evaluation,
                       splits: data_module.Splits, run_id: str, say: Callable[[str], None], stop: StopSignals) -> JobResult:
    """Export, then commit: register, publish, gate, finish the run — all of it, or (rolled back) none."""
    name = cfg.registry.model_name
    _step(say, "export")
    staging = export.export_to_staging(result.model, Path(cfg.export.base_dir))
    try:
        export.verify_export(staging, result.model, splits.x_test[:VERIFY_BATCH])
        say("export verified: the reloaded SavedModel agrees with the trained model")
        info = register.log_model(result.model, staging)
        with stop.deferred(keep=True):
            outcome, version, export_path = _commit(cfg, info.model_uri, staging, evaluation, splits, run_id, say)
    finally:
        export.discard(staging)  # a no-op once published
    decision = outcome.decision
    say(f"registered {name} version {version} (alias {register.CHALLENGER})")
    say(f"gate: {'PROMOTED to ' + register.CHAMPION if decision.promote else 'not promoted'} — {decision.reason}")
    say(f"SavedModel: {export_path}")
    if stop.received:
        say(f"{stop.received} arrived during the commit, too late to undo it: version {version} is complete and the run FINISHED")
    return JobResult(run_id, version, evaluation.accuracy, decision.promote, str(export_path), decision,
                     result.wall_time_s, result.epochs_run, len(splits.x_train))


def _commit(cfg: PipelineConfig, model_uri: str, staging: Path, evaluation: evaluate.Evaluation, splits: data_module.Splits,
            run_id: str, say: Callable[[str], None]) -> tuple[register.GateOutcome, str, Path]:
    name = cfg.registry.model_name
    _step(say, "register")
    version = register.register(model_uri, name, run_id, tags={"test_accuracy": f"{evaluation.accuracy:.6f}", "config": cfg.name}).version
    export_path, moved_from = None, False
    previous: str | None = None
    try:
        _step(say, "publish")
        mlflow.set_tag(recover.EXPORT_PATH_TAG, str((staging.parent / str(version)).resolve()))
        export_path = export.publish(staging, version)

        _step(say, "gate")

        def remember(champion: str | None) -> None:
            nonlocal moved_from, previous
            mlflow.set_tag(recover.PREVIOUS_CHAMPION_TAG, champion or "none")
            moved_from, previous = True, champion

        outcome = register.gate_and_promote(
            name, version, evaluation.accuracy, cfg.registry.accuracy_floor,
            champion_accuracy=lambda v: register.saved_model_accuracy(f"models:/{name}/{v}", splits.x_test, splits.y_test),
            before_promote=remember)
        mlflow.log_metrics({"gate_candidate_accuracy": evaluation.accuracy,
                            **({"gate_champion_accuracy": outcome.decision.champion_accuracy}
                               if outcome.decision.champion_accuracy is not None else {})})
        mlflow.set_tags({"gate_decision": "promoted" if outcome.decision.promote else "not promoted",
                         "gate_reason": outcome.decision.reason, "registered_version": version,
                         "gate_champion_version": outcome.previous_champion or "none"})
        mlflow.end_run("FINISHED")
    except BaseException as exc:
        say(f"commit failed ({type(exc).__name__}): rolling back version {version}")
        if moved_from:
            register.restore_champion(name, previous)
        register.delete_version(name, version)
        if export_path is not None:
            export.unpublish(export_path)
        raise
    return outcome, version, export_path


def _log_dataset(data: data_module.MnistData) -> None:
    source = KERAS_MNIST_URL if data.spec.source == "keras" else str(Path(data.spec.path).resolve())
    mlflow.set_tag("data_digest", data.digest)
    for context, (x, y) in {"training": (data.x_train, data.y_train), "testing": (data.x_test, data.y_test)}.items():
        with warnings.catch_warnings():  # a local path "can be interpreted in multiple ways"; all mean the same
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_numpy(x, targets=y, source=source, name=f"mnist-{context}-{data.digest}")
        mlflow.log_input(dataset, context=context)


def _log_artifacts(model: keras.Model, history: dict, evaluation: evaluate.Evaluation, x_test: np.ndarray) -> None:
    with tempfile.TemporaryDirectory(prefix="mnist-artifacts-") as tmp:
        out = Path(tmp)
        plots = [
            *evaluate.plot_curves(history, out),
            evaluate.plot_confusion_matrix(evaluation, out),
            evaluate.plot_misclassified(x_test, evaluation, out),
            evaluate.plot_feature_maps(model, x_test[0], out),
        ]
        for path in plots:
            mlflow.log_artifact(str(path), artifact_path="plots")
        summary = io.StringIO()
        with redirect_stdout(summary):
            model.summary()
        mlflow.log_text(summary.getvalue(), "model_summary.txt")
        mlflow.log_text(evaluation.report(), "classification_report.txt")

