"""The training job in one MLflow run: data -> train -> evaluate -> export (stage, verify, log) -> commit.

The commit is register -> publish the export -> gate -> finish the run. A run that fails or is stopped
before the commit is marked FAILED, registers nothing and leaves no export behind; once the commit has
begun, it completes or rolls back as a whole. What a killed process leaves, the next ``train`` (or
``python -m pipeline recover``) cleans up.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import numpy as np

from contract import CHALLENGER, CHAMPION, TEST_ACCURACY_TAG, registry_uri
from pipeline import data as data_module
from pipeline import distributed, evaluate, export, publish, recover, register, tracking
from pipeline import feedback as feedback_module
from pipeline.config import PipelineConfig
from pipeline.gate import GateDecision, GateOutcome, gate_and_promote
from pipeline.stop import StopSignals
from pipeline.train import TrainResult, configure_devices, duration, train

KERAS_MNIST_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
VERIFY_BATCH = 512
SYSTEM_METRICS_INTERVAL_S = 5.0


@dataclass(frozen=True)
class JobResult:
    run_id: str
    model_version: str
    test_accuracy: float
    promoted: bool
    export_path: str
    decision: GateDecision
    train_wall_time_s: float
    epochs_run: int
    train_images: int


def run_training(
    cfg: PipelineConfig,
    data_spec: data_module.DataSpec,
    say: Callable[[str], None] = print,
    role: distributed.Role | None = None,
    stop: StopSignals | None = None,
    feedback: Path | None = None,
) -> JobResult:
    """The whole job in one MLflow run, as this process's ``role`` (the chief of a cluster, or alone:
    the default, or the cluster in ``TF_CONFIG`` when the config says multi_worker). ``stop``
    (installed by the CLI) keeps signals out of the commit."""
    stop = stop or StopSignals()
    role = role or distributed.role_for(cfg.training.strategy)
    configure_devices(cfg.training)
    role.join(say)
    tracking.setup(cfg.registry.experiment, say)
    recover.recover(cfg.registry.model_name, cfg.registry.experiment, Path(cfg.export.base_dir), say=say)
    mlflow.set_system_metrics_sampling_interval(SYSTEM_METRICS_INTERVAL_S)
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # its start/stop lines are noise
    run = mlflow.start_run(run_name=cfg.name, tags=tracking.liveness_tags(), log_system_metrics=True)
    run_id, step = run.info.run_id, "start"
    try:
        with tracking.Heartbeat(run_id):
            say(f"MLflow run {run_id} ({tracking.tracking_uri()})")
            mlflow.set_tags({"config": cfg.name, "data_source": data_spec.describe()})
            if role.cluster is not None:
                mlflow.set_tags({"cluster_tasks": str(role.cluster.size), "cluster_chief": role.cluster.task})
            mlflow.log_params({**cfg.flat(), "data.source": data_spec.source, "data.path": data_spec.shown_path})

            step = _step(say, "data")
            data, splits = data_module.prepare(data_spec, cfg.data, cfg.seed)
            say(f"data: {data_spec.describe()} train={len(data.x_train)} test={len(data.x_test)} digest={data.digest}")
            _log_dataset(data)
            if feedback is not None:
                splits = _with_feedback(splits, feedback, say)

            step = _step(say, "train")
            say(plan(cfg, len(splits.x_train)))
            result = train(cfg, splits, say, role=role)
            say(f"trained {result.epochs_run} epochs on {result.replicas} replica(s) in {result.wall_time_s:.1f}s")
            mlflow.set_tags({"replicas": str(result.replicas), "training_wall_time_s": f"{result.wall_time_s:.1f}"})
            mlflow.log_metrics({"training_wall_time_s": result.wall_time_s, "epochs_run": result.epochs_run})

            with distributed.verdict_to_workers(role.multi_worker):
                step = _step(say, "evaluate")
                evaluation = _evaluate(result, splits)
                say(
                    f"test accuracy {evaluation.accuracy:.4f}, test loss {evaluation.loss:.4f}, "
                    f"training {result.wall_time_s:.1f}s"
                )

                step = "export"
                return _export_and_commit(cfg, run_id, result, evaluation, splits, say, stop)
    except BaseException as exc:
        if mlflow.active_run() is not None:
            _describe_failure(step, exc)
            mlflow.end_run("FAILED")
        raise
    finally:
        if mlflow.active_run() is None:  # ended, FINISHED or FAILED: liveness no longer matters
            tracking.forget_liveness(run_id)


def run_worker(
    cfg: PipelineConfig, data_spec: data_module.DataSpec, role: distributed.Role, say: Callable[[str], None] = print
) -> TrainResult:
    """A non-chief task of a multi-worker cluster: the same data and training as the chief, in
    lockstep with it, then it waits for the chief's outcome; it writes nothing (no MLflow run, no
    export, no registry)."""
    configure_devices(cfg.training)
    role.join(say)
    data, splits = data_module.prepare(data_spec, cfg.data, cfg.seed)
    say(f"data: {data_spec.describe()} train={len(data.x_train)} digest={data.digest}")
    result = train(cfg, splits, say, role=role)
    say(f"trained {result.epochs_run} epochs on {result.replicas} replica(s) in {result.wall_time_s:.1f}s")
    say("waiting for the chief to evaluate, export, register and gate")
    if distributed.settle(failed=False):
        raise distributed.ChiefFailed("the chief's run failed after training, and nothing was registered (its log says why)")
    say("the chief's run finished")
    return result


def plan(cfg: PipelineConfig, train_images: int) -> str:
    """What training will do and, when the config says how fast it trained on a reference machine, how long."""
    tcfg = cfg.training
    line = (
        f"plan: train {cfg.name} for up to {tcfg.epochs} epochs on {train_images:,} images (batch {tcfg.batch_size}), "
        "then evaluate, export, register and gate"
    )
    if cfg.estimate.images_per_s:
        expected = tcfg.epochs * train_images / cfg.estimate.images_per_s
        roughly = f"{round(expected / 60)} min" if expected >= 90 else f"{max(5, round(expected / 5) * 5)} s"
        line += (
            f"; expect about {roughly} of training on {cfg.estimate.measured_on} "
            f"({cfg.estimate.images_per_s:,.0f} images/s there; a busy machine is slower), and an ETA after each epoch"
        )
    return line


def _step(say: Callable[[str], None], name: str) -> str:
    """Announce a step of the job. For fault drills and tests, ``PIPELINE_PAUSE_AT=<step>`` pauses
    there for ``PIPELINE_PAUSE_S`` seconds (10), so a signal or a kill can land at a known step."""
    say(f"step: {name}")
    if os.environ.get("PIPELINE_PAUSE_AT") == name:
        time.sleep(float(os.environ.get("PIPELINE_PAUSE_S") or 10))
    return name


def _evaluate(result: TrainResult, splits: data_module.Splits) -> evaluate.Evaluation:
    """Score on the test split and log the metrics, the plots and the classification report."""
    evaluation = evaluate.score(result.model, splits.x_test, splits.y_test)
    mlflow.log_metrics(evaluation.metrics())
    for name, figure in evaluate.figures(result.model, result.history, evaluation, splits.x_test).items():
        mlflow.log_figure(figure, f"plots/{name}")
        plt.close(figure)
    mlflow.log_text(evaluation.report(), "classification_report.txt")
    return evaluation


def _export_and_commit(
    cfg: PipelineConfig,
    run_id: str,
    result: TrainResult,
    evaluation: evaluate.Evaluation,
    splits: data_module.Splits,
    say: Callable[[str], None],
    stop: StopSignals,
) -> JobResult:
    """Stage -> verify -> log the export, then commit it: all of the commit, or (rolled back) none."""
    _step(say, "export")
    staging = export.export_to_staging(result.model, Path(cfg.export.base_dir))
    try:
        export.verify_export(staging, result.model, splits.x_test[:VERIFY_BATCH])
        say("export verified: the reloaded SavedModel agrees with the trained model")
        info = register.log_model(result.model, staging)
        with stop.deferred(keep=True):
            version, export_path, outcome = _commit(cfg, info.model_uri, staging, evaluation, splits, result, say)
    finally:
        publish.discard(staging)  # a no-op once published
    decision = outcome.decision
    say(f"registered {cfg.registry.model_name} version {version} (alias {CHALLENGER})")
    say(f"gate: {'PROMOTED to ' + CHAMPION if decision.promote else 'not promoted'} — {decision.reason}")
    say(f"SavedModel: {export_path}")
    if stop.received:
        say(f"{stop.received} arrived during the commit, too late to undo it: version {version} is complete and the run FINISHED")
    return JobResult(
        run_id,
        version,
        evaluation.accuracy,
        decision.promote,
        str(export_path),
        decision,
        result.wall_time_s,
        result.epochs_run,
        len(splits.x_train),
    )


def _commit(
    cfg: PipelineConfig,
    model_uri: str,
    staging: Path,
    evaluation: evaluate.Evaluation,
    splits: data_module.Splits,
    result: TrainResult,
    say: Callable[[str], None],
) -> tuple[str, Path, GateOutcome]:
    """Register -> publish -> gate -> finish the run. Each step that changes the store pushes its undo;
    an error anywhere runs the undos, newest first, and re-raises."""
    name = cfg.registry.model_name
    _step(say, "register")
    version = register.register(
        model_uri,
        name,
        tags={TEST_ACCURACY_TAG: f"{evaluation.accuracy:.6f}", "config": cfg.name},
        description=f"{cfg.name}: test accuracy {evaluation.accuracy:.4f} (gate pending)",
    ).version
    with ExitStack() as undo:
        undo.callback(register.delete_version, name, version)
        try:
            _step(say, "publish")
            mlflow.set_tag(recover.EXPORT_PATH_TAG, os.path.relpath(staging.parent / str(version), cfg.export.base_dir))
            export_path = publish.publish(staging, version)
            undo.callback(publish.unpublish, export_path)

            _step(say, "gate")
            outcome = _gate(cfg, version, evaluation, splits, undo, say)

            _step(say, "finish")
            _describe_outcome(cfg, version, evaluation, result, outcome)
            mlflow.end_run("FINISHED")
        except BaseException as exc:
            say(f"commit failed ({type(exc).__name__}): rolling back version {version}")
            raise
        undo.pop_all()  # committed: nothing to undo
    return version, export_path, outcome


def _gate(
    cfg: PipelineConfig,
    version: str,
    evaluation: evaluate.Evaluation,
    splits: data_module.Splits,
    undo: ExitStack,
    say: Callable[[str], None],
) -> GateOutcome:
    """Decide under the gate lock, against the champion re-scored on this run's test data, and log why."""
    name = cfg.registry.model_name

    def before_promote(previous: str | None) -> None:
        mlflow.set_tag(recover.PREVIOUS_CHAMPION_TAG, previous or "none")
        undo.callback(register.restore_champion, name, previous)
        _step(say, "promote")  # under the gate lock, the alias about to move

    outcome = gate_and_promote(
        name,
        version,
        evaluation.accuracy,
        cfg.registry.accuracy_floor,
        champion_accuracy=lambda champion: evaluate.registered_accuracy(
            registry_uri(name, champion), splits.x_test, splits.y_test
        ),
        before_promote=before_promote,
    )
    decision = outcome.decision
    mlflow.log_metrics(
        {
            "gate_candidate_accuracy": evaluation.accuracy,
            **({"gate_champion_accuracy": decision.champion_accuracy} if decision.champion_accuracy is not None else {}),
        }
    )
    mlflow.set_tags(
        {
            "gate_decision": "promoted" if decision.promote else "not promoted",
            "gate_reason": decision.reason,
            "registered_version": version,
            "gate_champion_version": outcome.previous_champion or "none",
        }
    )
    return outcome


def _describe_outcome(
    cfg: PipelineConfig, version: str, evaluation: evaluate.Evaluation, result: TrainResult, outcome: GateOutcome
) -> None:
    """The run's description (its note in the MLflow UI) and the registered version's: what came of it and why."""
    decision, name = outcome.decision, cfg.registry.model_name
    verdict = (
        f"promoted to `{CHAMPION}`"
        if decision.promote
        else f"not promoted (`{CHAMPION}` stays on version {outcome.previous_champion})"
        if outcome.previous_champion
        else f"not promoted (there is no `{CHAMPION}` yet)"
    )
    mlflow.set_tag(
        "mlflow.note.content",
        "\n".join(
            [
                f"**{cfg.name}**: test accuracy **{evaluation.accuracy:.4f}** (loss {evaluation.loss:.4f}) after "
                f"{result.epochs_run} epochs, {duration(result.wall_time_s)} of training on {result.replicas} replica(s).",
                "",
                f"Registered as **{name} version {version}**; gate: **{verdict}**: {decision.reason}.",
            ]
        ),
    )
    run_id = mlflow.active_run().info.run_id
    register.describe_version(
        name,
        version,
        f"Config {cfg.name}, run {run_id}: test accuracy {evaluation.accuracy:.4f}; gate: {verdict}: {decision.reason}.",
    )


def _describe_failure(step: str, exc: BaseException) -> None:
    what = "stopped" if isinstance(exc, KeyboardInterrupt) else "failed"
    reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    try:
        mlflow.set_tag(
            "mlflow.note.content", f"**{what} at step {step}** ({type(exc).__name__}): {reason}. Nothing was registered."
        )
    except Exception:  # the store itself may be what failed; the run is still marked FAILED
        pass


def _with_feedback(splits: data_module.Splits, path: Path, say: Callable[[str], None]) -> data_module.Splits:
    """Reviewed user feedback joins the training split only (never validation or test), logged as its
    own MLflow dataset with its counts."""
    x, y = feedback_module.load_reviewed(path)
    say(f"feedback: {len(x)} reviewed examples from {path} join the training split ({len(splits.x_train)} before)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        digest = hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()[:16]
        dataset = mlflow.data.from_numpy(x, targets=y, source=os.path.relpath(path), name=f"feedback-{digest}")
    mlflow.log_input(dataset, context="training-feedback")
    mlflow.log_params({"feedback.examples": len(x), "feedback.path": Path(path).name})
    return dataclasses.replace(splits, x_train=np.concatenate([splits.x_train, x]), y_train=np.concatenate([splits.y_train, y]))


def _log_dataset(data: data_module.MnistData) -> None:
    source = KERAS_MNIST_URL if data.spec.source == "keras" else data.spec.shown_path
    mlflow.set_tag("data_digest", data.digest)
    for context, (x, y) in {"training": (data.x_train, data.y_train), "testing": (data.x_test, data.y_test)}.items():
        with warnings.catch_warnings():  # a local path "can be interpreted in multiple ways"; all mean the same
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_numpy(x, targets=y, source=source, name=f"mnist-{context}-{data.digest}")
        mlflow.log_input(dataset, context=context)
