"""Hyperparameter search: an Optuna study whose trials train configs drawn from a search space, each
tracked as a nested MLflow run, for the best validation accuracy per unit of serving cost.

Two objectives by default — maximise validation accuracy (never the test split, which stays for the
final evaluation and the gate) and minimise milliseconds per image through the exported signature —
so the study yields a Pareto front; ``objective="accuracy"`` optimises accuracy alone. The study lives
in a relational database, so several ``tune`` processes pointed at one study share its trials, and
running the same command again resumes it: ``trials`` is the number of finished (complete or pruned)
trials the study should hold.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from contract import sqlite_path, tracking_uri
from pipeline import data as data_module
from pipeline import evaluate, tracking
from pipeline.config import PipelineConfig, load_config, with_values
from pipeline.cost import BATCH, serving_cost
from pipeline.errors import ConfigError
from pipeline.search_space import Pruning, SearchSpace
from pipeline.train import configure_devices, train

OBJECTIVES = {"accuracy-cost": ("maximize", "minimize"), "accuracy": ("maximize",)}
HISTORY = "val_accuracy_history"  # per-epoch validation accuracy, kept on each trial for the pruner
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
OPTUNA_DB = "optuna.db"


@dataclass(frozen=True)
class StudyPlan:
    """What one ``tune`` invocation works on (the Optuna study it opens is :func:`open_study`'s)."""

    name: str
    storage: str
    config: str
    space: SearchSpace
    overrides: list[str]
    objective: str = "accuracy-cost"
    seed: int | None = None
    fixed: dict[str, Any] = field(default_factory=dict)  # what --set fixed for every trial (not in the space)

    @property
    def max_epochs(self) -> int:
        """The most epochs a trial can run (the space's upper bound, else the config's)."""
        epochs = self.space.params.get("training.epochs")
        if epochs is not None:
            return int(max(epochs.extremes()))
        return load_config(self.config, self.overrides).training.epochs

    @property
    def directions(self) -> tuple[str, ...]:
        return OBJECTIVES[self.objective]


# -- storage ---------------------------------------------------------------------------------------------


def default_storage() -> str:
    """``$OPTUNA_STORAGE``, else ``optuna.db`` beside an embedded SQLite MLflow store."""
    if os.environ.get("OPTUNA_STORAGE"):
        return os.environ["OPTUNA_STORAGE"]
    store = sqlite_path(tracking_uri())
    if store is None:
        raise ConfigError(
            f"the MLflow store is a server ({tracking_uri()}): give the study a database with --storage or "
            "$OPTUNA_STORAGE (e.g. postgresql://user:password@host:5432/optuna)"
        )
    return f"sqlite:///{store.parent / OPTUNA_DB}"


def sqlalchemy_url(storage: str) -> str:
    """``postgresql://`` URLs (what MLflow and psql take) with the psycopg 3 driver SQLAlchemy needs."""
    return storage.replace("postgresql://", "postgresql+psycopg://", 1) if storage.startswith("postgresql://") else storage


def open_study(study: StudyPlan) -> optuna.Study:
    """Create the study, or load it to resume; refuses one made with other objectives or another space."""
    fixed = json.dumps(study.fixed, sort_keys=True).encode()  # resuming with other --set values would mix fidelities
    fingerprint = hashlib.sha256(study.space.path.read_bytes() + fixed).hexdigest()[:16]
    sampler = optuna.samplers.TPESampler(seed=study.seed, n_startup_trials=5)
    pruner = optuna_pruner(study.space.pruning)
    for attempt in range(5):
        try:
            opened = optuna.create_study(
                study_name=study.name,
                storage=sqlalchemy_url(study.storage),
                directions=list(study.directions),
                sampler=sampler,
                pruner=pruner if study.objective == "accuracy" else optuna.pruners.NopPruner(),
                load_if_exists=True,
            )
            break
        except ValueError as exc:
            raise ConfigError(f"study {study.name!r} in {_redacted(study.storage)}: {exc}") from None
        except Exception:  # another worker creating the same tables or study at this moment
            if attempt == 4:
                raise
            time.sleep(1 + attempt)
    if [d.name.lower() for d in opened.directions] != list(study.directions):
        raise ConfigError(f"study {study.name!r} optimises other objectives; use another --study name or --objective")
    recorded = opened.user_attrs.get("space_fingerprint")
    if recorded is None:
        opened.set_user_attr("space_fingerprint", fingerprint)
        opened.set_user_attr("space_file", str(study.space.path))
        opened.set_user_attr("config", study.config)
    elif recorded != fingerprint:
        raise ConfigError(
            f"study {study.name!r} was created with another search space ({opened.user_attrs.get('space_file')}) "
            "or other --set values; resume it with the same ones, or start a new study with --study"
        )
    return opened


def optuna_pruner(pruning: Pruning) -> optuna.pruners.BasePruner:
    """Optuna's own pruner for a single-objective study (two-objective studies use :func:`should_prune`)."""
    if pruning.kind == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=pruning.min_epochs, reduction_factor=pruning.reduction_factor)
    if pruning.kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=pruning.min_epochs, reduction_factor=pruning.reduction_factor)
    return optuna.pruners.PercentilePruner(
        pruning.percentile, n_startup_trials=pruning.startup_trials, n_warmup_steps=pruning.warmup_epochs
    )


def _redacted(storage: str) -> str:
    scheme, sep, rest = storage.partition("://")
    return f"{scheme}{sep}{rest.rsplit('@', 1)[-1]}" if "@" in rest else storage


# -- pruning ---------------------------------------------------------------------------------------------


def should_prune(completed: list[list[float]], epoch: int, accuracy: float, pruning: Pruning) -> bool:
    """The percentile rule: whether a trial at ``epoch`` (0-based) with this validation accuracy falls
    below the pruning percentile of the completed trials' accuracies at the same epoch."""
    if epoch < pruning.warmup_epochs:
        return False
    at_epoch = [history[epoch] for history in completed if len(history) > epoch]
    if len(at_epoch) < max(1, pruning.startup_trials):
        return False
    return accuracy < float(np.percentile(at_epoch, pruning.percentile))


def halving_prunes(others: list[list[float]], epoch: int, accuracy: float, first_rung: int, reduction_factor: int) -> bool:
    """Successive halving: at a rung (epochs ``first_rung * reduction_factor**k``), a trial goes on only
    if its accuracy is among the best ``1/reduction_factor`` of the trials that reached that rung,
    itself included (at least the best one goes on), as Optuna's SuccessiveHalvingPruner decides."""
    done = epoch + 1
    rung = first_rung
    while rung < done:
        rung *= reduction_factor
    if rung != done:
        return False
    competing = sorted([history[epoch] for history in others if len(history) > epoch] + [accuracy], reverse=True)
    promoted = max(len(competing) // reduction_factor, 1)
    return accuracy < competing[promoted - 1]


def hyperband_brackets(pruning: Pruning, max_epochs: int) -> int:
    """How many successive-halving brackets Hyperband runs: each starts judging at
    ``min_epochs * reduction_factor**bracket`` epochs, the last no later than ``max_epochs``."""
    brackets, first = 1, pruning.min_epochs * pruning.reduction_factor
    while first <= max_epochs:
        brackets, first = brackets + 1, first * pruning.reduction_factor
    return brackets


class PruneOnValidationAccuracy(keras.callbacks.Callback):
    """Feeds each epoch's validation accuracy to the pruner and stops training when it says so.

    With one objective, Optuna's own pruner decides (``trial.report``/``should_prune``). Optuna does not
    prune multi-objective studies, so there the same rules run on the other trials' per-epoch
    histories: the percentile rule against completed trials, or successive halving (Hyperband: within
    the trial's bracket, ``trial.number`` modulo the number of brackets) against every trial that reached
    the rung. Training stops after the epoch; the caller then raises ``TrialPruned``, so the model is
    never half-trained inside Keras."""

    def __init__(self, trial: optuna.Trial, pruning: Pruning, max_epochs: int = 1) -> None:
        super().__init__()
        self.trial, self.pruning = trial, pruning
        self.history: list[float] = []
        self.pruned_at: int | None = None
        brackets = hyperband_brackets(pruning, max_epochs) if pruning.kind == "hyperband" else 1
        self.bracket = trial.number % brackets
        trial.set_user_attr("bracket", self.bracket)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        accuracy = float((logs or {}).get("val_accuracy", math.nan))
        self.history.append(accuracy)
        self.trial.set_user_attr(HISTORY, self.history)
        if len(self.trial.study.directions) == 1:
            self.trial.report(accuracy, epoch)
            prune = self.trial.should_prune()
        elif self.pruning.kind == "percentile":
            completed = self.trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            prune = should_prune([t.user_attrs.get(HISTORY, []) for t in completed], epoch, accuracy, self.pruning)
        else:
            others = [
                t.user_attrs.get(HISTORY, [])
                for t in self.trial.study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING))
                if t.number != self.trial.number and t.user_attrs.get("bracket", 0) == self.bracket
            ]
            first_rung = self.pruning.min_epochs * self.pruning.reduction_factor**self.bracket
            prune = halving_prunes(others, epoch, accuracy, first_rung, self.pruning.reduction_factor)
        if prune:
            self.pruned_at = epoch
            self.model.stop_training = True


# -- trials ----------------------------------------------------------------------------------------------


def run_trial(
    trial: optuna.Trial, study: StudyPlan, base: PipelineConfig, splits: data_module.Splits, say: Callable[[str], None]
) -> Any:
    """Train one configuration in a nested MLflow run and return its objective values."""
    values = study.space.sample(trial)
    # from the base config as it was when the study started: editing the file mid-sweep changes no trial
    cfg = with_values(base, {**values, "name": f"{study.name}-trial-{trial.number}"})
    trial.set_user_attr("config", cfg.model_dump(mode="json"))
    run = mlflow.start_run(
        run_name=f"trial {trial.number}", nested=True, tags={"tune.study": study.name, "tune.trial": str(trial.number)}
    )
    trial.set_user_attr("mlflow_run_id", run.info.run_id)
    status, state = "FAILED", "FAILED"
    try:
        # the sampled values on their own too (numbers where the config holds lists): sortable, and what the
        # UI's parallel-coordinates view plots
        mlflow.log_params({**cfg.flat(), **{f"search.{key}": value for key, value in trial.params.items()}})
        pruner = PruneOnValidationAccuracy(trial, study.space.pruning, study.max_epochs)
        result = train(cfg, splits, lambda line: say(f"  trial {trial.number} {line}"), [pruner])
        if pruner.pruned_at is not None:
            status, state = "KILLED", "PRUNED"
            mlflow.log_metric("pruned_at_epoch", pruner.pruned_at)
            mlflow.set_tag(
                "mlflow.note.content",
                f"Trial {trial.number} of study **{study.name}**: pruned after epoch {pruner.pruned_at + 1} "
                f"(validation accuracy {pruner.history[-1]:.4f}, behind the trials before it at that epoch).",
            )
            raise optuna.TrialPruned(f"validation accuracy {pruner.history[-1]:.4f} at epoch {pruner.pruned_at + 1}")
        accuracy = evaluate.score(result.model, splits.x_val, splits.y_val).accuracy
        cost = serving_cost(result.model, splits.x_val[:BATCH])
        mlflow.log_metrics({"val_accuracy_final": accuracy, "training_wall_time_s": result.wall_time_s, **cost.metrics()})
        for key, value in {"val_accuracy": accuracy, **cost.metrics(), "training_s": result.wall_time_s}.items():
            trial.set_user_attr(key, value)
        status, state = "FINISHED", "COMPLETE"
        mlflow.set_tag(
            "mlflow.note.content",
            f"Trial {trial.number} of study **{study.name}**: validation accuracy **{accuracy:.4f}**, "
            f"{cost.ms_per_image:.4f} ms/image at batch {BATCH}, {result.epochs_run} epochs in "
            f"{result.wall_time_s:.0f} s. Sampled: " + ", ".join(f"`{k}={v}`" for k, v in trial.params.items()),
        )
    except optuna.TrialPruned:
        raise
    except Exception as exc:  # the trial fails, the study goes on; its progress line says why
        trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:500])
        mlflow.set_tag("trial_error", f"{type(exc).__name__}: {exc}"[:500])
        raise
    finally:
        mlflow.set_tag("trial_state", state)
        mlflow.end_run(status)
    return (accuracy, cost.ms_per_image) if len(study.directions) == 2 else accuracy


def run_study(
    study: StudyPlan,
    trials: int,
    data_spec: data_module.DataSpec,
    timeout: float | None = None,
    say: Callable[[str], None] = print,
) -> optuna.Study:
    """Run trials until the study holds ``trials`` finished ones (or ``timeout`` seconds pass), in one
    parent MLflow run that ends with the Pareto front as tables and plots."""
    base = load_config(study.config, study.overrides)
    configure_devices(base.training)
    tracking.setup(base.registry.experiment, say)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial is reported on its own progress line
    opened = open_study(study)
    _, splits = data_module.prepare(data_spec, base.data, base.seed)
    scored_on = "validation accuracy and ms/image" if len(study.directions) == 2 else "validation accuracy"
    say(
        f"study {study.name} ({_redacted(study.storage)}): {len(_finished(opened))} of {trials} trials finished; "
        f"trials are scored on {scored_on}, with {len(splits.x_train):,} training and {len(splits.x_val):,} "
        f"validation images ({data_spec.describe()})"
    )
    parent = mlflow.start_run(
        run_name=f"tune {study.name}", tags={"tune.study": study.name, "tune.storage": _redacted(study.storage)}
    )
    status = "FAILED"
    try:
        mlflow.log_params({"tune.config": study.config, "tune.objective": study.objective, "tune.trials": trials})
        if study.fixed:  # --set values hold for every trial and are not searched
            mlflow.log_params({f"fixed.{key}": value for key, value in study.fixed.items()})
            mlflow.set_tag("tune.fixed", ", ".join(f"{key}={value}" for key, value in study.fixed.items()))
        mlflow.log_artifact(str(study.space.path), artifact_path="search_space")
        mlflow.set_tag(
            "mlflow.note.content",
            f"Hyperparameter search **{study.name}** over `{study.space.path.name}` from config `{study.config}`: "
            f"{trials} trials scored on {scored_on}, each a nested run below. "
            + (f"Fixed for every trial: {', '.join(f'`{k}={v}`' for k, v in study.fixed.items())}. " if study.fixed else "")
            + "When it ends: `trials.json`, `pareto_front.json` and the plots in this run's artifacts.",
        )
        remaining = trials - len(_finished(opened))
        if remaining > 0:
            opened.optimize(
                lambda trial: run_trial(trial, study, base, splits, say),
                timeout=timeout,
                callbacks=[optuna.study.MaxTrialsCallback(trials, states=FINISHED), _progress(say)],
                catch=(Exception,),
                gc_after_trial=True,
            )
        else:
            say(f"study {study.name} already holds {trials} finished trials: raise --trials to run more")
        _log_summary(opened, say)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        mlflow.end_run(status)
        say(f"MLflow: parent run {parent.info.run_id}, one nested run per trial")
    return opened


def finished_trials(plan: StudyPlan) -> list[FrozenTrial]:
    """The finished trials of a study as stored (after an interruption, say)."""
    return optuna.load_study(study_name=plan.name, storage=sqlalchemy_url(plan.storage)).get_trials(states=FINISHED)


def _finished(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=FINISHED)


def _progress(say: Callable[[str], None]) -> Callable[[optuna.Study, FrozenTrial], None]:
    def report(study: optuna.Study, trial: FrozenTrial) -> None:
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        best = max((t.values[0] for t in complete), default=math.nan)
        attrs = trial.user_attrs
        if trial.state == TrialState.COMPLETE:
            detail = (
                f"val_accuracy {attrs['val_accuracy']:.4f}, {attrs['ms_per_image']:.4f} ms/image, "
                f"{attrs['parameters']:,} parameters, trained in {attrs['training_s']:.0f}s"
            )
        elif trial.state == TrialState.PRUNED:
            history = attrs.get(HISTORY, [])
            detail = f"after {len(history)} epoch(s) at val_accuracy {history[-1]:.4f}" if history else ""
        else:
            detail = attrs.get("error", "see its MLflow run")
        front = f", Pareto front {len(study.best_trials)} trial(s)" if len(study.directions) == 2 else ""
        say(f"trial {trial.number}: {trial.state.name.lower()} {detail} | best val_accuracy so far {best:.4f}{front}")

    return report


# -- the outcome ----------------------------------------------------------------------------------------


def pareto_front(study: optuna.Study) -> list[FrozenTrial]:
    """The trials no other completed trial beats on every objective, most accurate first."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return []
    front = study.best_trials if len(study.directions) == 2 else [study.best_trial]
    return sorted(front, key=lambda t: (-t.values[0], t.number))


def choose(study: optuna.Study, max_ms_per_image: float | None = None, count: int = 1) -> list[FrozenTrial]:
    """The ``count`` most accurate trials within the serving budget (ms/image), if one is given: the
    Pareto front's first, then the other completed trials by accuracy."""
    within = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if max_ms_per_image is None or t.user_attrs["ms_per_image"] <= max_ms_per_image
    ]
    front = [t for t in pareto_front(study) if t in within]
    rest = sorted((t for t in within if t not in front), key=lambda t: (-t.values[0], t.number))
    chosen = (front + rest)[:count]
    if not chosen:
        budget = f" within {max_ms_per_image} ms/image" if max_ms_per_image is not None else ""
        raise ConfigError(f"study {study.study_name} has no completed trial{budget} to retrain")
    return chosen


def retrain_top(
    study: optuna.Study,
    count: int,
    max_ms_per_image: float | None,
    retrain_set: list[str],
    data: str | None,
    write_to: Path | None = None,
    say: Callable[[str], None] = print,
) -> int:
    """Train the ``count`` best trials' configs on the full training data (``data.train_limit`` lifted,
    ``retrain_set`` applied) through the normal job, one ``python -m pipeline train`` each: every one
    is exported, registered and gated like any training. Returns 0, or the first failing job's code."""
    outcome = 0
    for trial in choose(study, max_ms_per_image, count):
        cfg = trial_config(trial, study.study_name)
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train_limit": None})})
        path = write_config(cfg, write_to if write_to and count == 1 else Path("tuned") / f"{cfg.name}.yaml")
        say(f"retrain: trial {trial.number} (val_accuracy {trial.values[0]:.4f}) on the full training data; config {path}")
        command = [sys.executable, "-m", "pipeline", "train", "--config", str(path), *(["--data", data] if data else [])]
        for override in retrain_set:
            command += ["--set", override]
        code = subprocess.run(command).returncode
        if code:
            say(f"retrain: trial {trial.number} failed (exit {code})")
            outcome = outcome or code
    return outcome


def trial_config(trial: FrozenTrial, study_name: str) -> PipelineConfig:
    cfg = PipelineConfig.model_validate(trial.user_attrs["config"])
    return cfg.model_copy(update={"name": f"{study_name}-trial-{trial.number}"})


def trial_rows(trials: list[FrozenTrial]) -> dict[str, list[Any]]:
    rows: dict[str, list[Any]] = {
        key: [] for key in ("trial", "state", "val_accuracy", "ms_per_image", "parameters", "flops", "mlflow_run_id")
    }
    for trial in trials:
        rows["trial"].append(trial.number)
        rows["state"].append(trial.state.name)
        for key in ("val_accuracy", "ms_per_image", "parameters", "flops", "mlflow_run_id"):
            rows[key].append(trial.user_attrs.get(key))
    return rows


def _log_summary(study: optuna.Study, say: Callable[[str], None]) -> None:
    trials = study.get_trials(deepcopy=False)
    counts = {state: sum(t.state == state for t in trials) for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    front = pareto_front(study)
    mlflow.log_metrics(
        {
            "trials_complete": counts[TrialState.COMPLETE],
            "trials_pruned": counts[TrialState.PRUNED],
            "trials_failed": counts[TrialState.FAIL],
            "pareto_size": len(front),
            **({"best_val_accuracy": front[0].values[0]} if front else {}),
        }
    )
    mlflow.log_table(trial_rows(trials), "trials.json")
    mlflow.log_table(trial_rows(front), "pareto_front.json")
    _log_plots(study)
    say(
        f"study {study.study_name}: {counts[TrialState.COMPLETE]} complete, {counts[TrialState.PRUNED]} pruned, "
        f"{counts[TrialState.FAIL]} failed; Pareto front (most accurate first):"
    )
    say(f"  {'trial':>5}  {'val_accuracy':>12}  {'ms/image':>9}  {'parameters':>10}  {'MFLOPs':>7}")
    for trial in front:
        attrs = trial.user_attrs
        say(
            f"  {trial.number:>5}  {attrs['val_accuracy']:>12.4f}  {attrs['ms_per_image']:>9.4f}  "
            f"{attrs['parameters']:>10,}  {attrs['flops'] / 1e6:>7.2f}"
        )


def _log_plots(study: optuna.Study) -> None:
    """Pareto front, optimisation history and parameter importances (when there is enough to plot)."""
    from optuna.visualization import matplotlib as optuna_plots

    accuracy = {"target": lambda t: t.values[0], "target_name": "validation accuracy"}
    plots = {
        "optimization_history.png": lambda: optuna_plots.plot_optimization_history(study, **accuracy),
        "param_importances.png": lambda: optuna_plots.plot_param_importances(study, **accuracy),
    }
    if len(study.directions) == 2:
        plots["pareto_front.png"] = lambda: optuna_plots.plot_pareto_front(
            study, target_names=["validation accuracy", "ms/image"]
        )
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                axes = plot()
        except (ValueError, RuntimeError, ZeroDivisionError):
            continue  # e.g. importances need two completed trials with varying parameters
        figure = (axes.flat[0] if isinstance(axes, np.ndarray) else axes).figure
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        mlflow.log_figure(figure, f"plots/{name}")
        plt.close(figure)


def write_config(cfg: PipelineConfig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# chosen by `python -m pipeline tune`; train it with --config {path}\n{cfg.to_yaml()}")
    return path
