"""``python -m pipeline train | evaluate | promote | recover | tune`` — a thin layer over the pipeline's modules."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import quiet
from contract import CHAMPION, REGISTERED_MODEL, registry_uri

DEFAULT_CONFIG = "champion"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    # Heavy imports after parsing, so --help and usage errors answer at once. TensorFlow (10 s of CPU
    # on 2 cores) only in the commands that run a model, after their configs are checked.
    from mlflow.exceptions import MlflowException

    from pipeline.distributed import WorkerFailed
    from pipeline.errors import PipelineError
    from pipeline.stop import exit_status

    try:
        return args.handler(args)
    except WorkerFailed as exc:
        # Another task of the training cluster is gone; the run is already marked FAILED. TensorFlow's
        # collective runtime is left half torn down, and finalising its thread pools at interpreter exit
        # sometimes printed a traceback (multiprocessing's Pool.__del__ on a closed pipe): leave at once.
        print(f"error: {exc}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    except MlflowException as exc:
        print(f"error: MLflow: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"interrupted ({exc or 'SIGINT'}): the MLflow run is marked FAILED and nothing was registered", file=sys.stderr)
        return exit_status(exc)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train",
        help="train, export, register and gate a model",
        description="Train a config, log it to MLflow, export a SavedModel, register it "
        "as the challenger and promote it to champion if it passes the gate.",
    )
    train.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help=f"named config (champion: our best, ~6 min on 2 CPU cores; seed: the notebook's, ~1 min) "
        f"or a .yaml path [{DEFAULT_CONFIG}]",
    )
    train.add_argument(
        "--data",
        help="keras | path to a Keras-layout .npz | directory of IDX files "
        "(default: $PIPELINE_DATA, then the config's data.source)",
    )
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set epochs=3 --set training.batch_size=256",
    )
    train.add_argument(
        "--feedback",
        type=Path,
        metavar="REVIEWED.npz",
        help="add reviewed user feedback (from `feedback export`) to the training split only",
    )
    train.set_defaults(handler=_train)

    feedback = sub.add_parser(
        "feedback",
        help="users' corrections from the service (FEEDBACK_DIR): stats, or export them for review and training",
    )
    feedback.add_argument("action", choices=["stats", "export"])
    feedback.add_argument("directory", type=Path, help="the service's FEEDBACK_DIR")
    feedback.add_argument("--out", type=Path, default=Path("feedback-reviewed.npz"), help="export: the .npz to write")
    feedback.set_defaults(handler=_feedback)

    evaluate = sub.add_parser(
        "evaluate",
        help="evaluate a registered model version on a dataset",
        description="Download a registered version's SavedModel and report its accuracy.",
    )
    evaluate.add_argument(
        "--model", default=CHAMPION, help=f"alias ({CHAMPION}), version number (3) or models:/ URI [{CHAMPION}]"
    )
    evaluate.add_argument("--name", default=REGISTERED_MODEL, help=f"registered model name [{REGISTERED_MODEL}]")
    evaluate.add_argument("--data", help="as for train (default: $PIPELINE_DATA, then keras)")
    evaluate.add_argument("--split", choices=["test", "train"], default="test", help="which split to score [test]")
    evaluate.set_defaults(handler=_evaluate)

    promote = sub.add_parser("promote", help="move an alias (champion) to a version by hand")
    promote.add_argument("version", help="model version number")
    promote.add_argument("--name", default=REGISTERED_MODEL, help=f"registered model name [{REGISTERED_MODEL}]")
    promote.add_argument("--alias", default=CHAMPION, help=f"alias to move [{CHAMPION}]")
    promote.set_defaults(handler=_promote)

    recover = sub.add_parser(
        "recover",
        help="clean up after a training process that died",
        description="Mark runs left RUNNING by dead processes FAILED, delete model versions "
        "whose run did not finish (restoring the champion they replaced), remove "
        "their exports and staging directories, break a dead gate lock. "
        "Every train does this first.",
    )
    recover.add_argument(
        "--config", default=DEFAULT_CONFIG, help=f"config naming the experiment, model and export dir [{DEFAULT_CONFIG}]"
    )
    recover.add_argument(
        "--stale-after",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="a run from another host is dead after this long without a heartbeat [600]",
    )
    recover.set_defaults(handler=_recover)

    tune = sub.add_parser(
        "tune",
        help="search hyperparameters (Optuna) for the best accuracy per unit of serving cost",
        description="Run an Optuna study over a search space: each trial trains a config drawn from it, as a nested "
        "MLflow run, and is scored on validation accuracy and ms/image through its exported signature. The study "
        "lives in a database: run the same command again to resume it, or several at once to share its trials.",
    )
    tune.add_argument(
        "--space", default="champion", help="search space: a YAML file or a name under pipeline/configs/search/ [champion]"
    )
    tune.add_argument("--config", help="the config trials start from [the space's base, else champion]")
    tune.add_argument("--trials", type=int, required=True, help="finished (complete or pruned) trials the study should hold")
    tune.add_argument("--timeout", type=float, metavar="SECONDS", help="start no new trial after this long")
    tune.add_argument("--study", help="study name [the space file's name]")
    tune.add_argument("--storage", help="study database URL [$OPTUNA_STORAGE, else optuna.db beside the MLflow store]")
    tune.add_argument("--data", help="as for train")
    tune.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fix a value for every trial; a key the space varies is taken out of the search (e.g. --set "
        "data.train_limit=10000 --set epochs=6 for cheap trials)",
    )
    tune.add_argument(
        "--objective",
        choices=["accuracy-cost", "accuracy"],
        default="accuracy-cost",
        help="accuracy-cost: a Pareto front of validation accuracy and ms/image; accuracy: accuracy alone [accuracy-cost]",
    )
    tune.add_argument("--seed", type=int, help="seed the sampler (reproducible suggestions)")
    tune.add_argument(
        "--promote-best",
        action="store_true",
        help="then train the most accurate Pareto trial through the normal job (export, registry, gate); "
        "the same as --retrain-top 1",
    )
    tune.add_argument(
        "--retrain-top",
        type=int,
        default=0,
        metavar="K",
        help="then train the K most accurate Pareto trials (within --max-ms-per-image) on the full training data "
        "through the normal job, each gated",
    )
    tune.add_argument(
        "--retrain-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="with --retrain-top: a value for the retraining only (e.g. epochs=30 after trials of a few epochs)",
    )
    tune.add_argument("--max-ms-per-image", type=float, help="with --promote-best: only trials within this serving cost")
    tune.add_argument(
        "--write-config", type=Path, help="where --promote-best writes the chosen config [tuned/<study>-trial-<n>.yaml]"
    )
    tune.set_defaults(handler=_tune)
    return parser


def _feedback(args: argparse.Namespace) -> int:
    from pipeline import feedback

    records = feedback.read_records(args.directory)
    if args.action == "stats":
        print(json.dumps(feedback.stats(records), indent=2))
        return 0
    count = feedback.export(records, args.out)
    print(f"exported {count} feedback examples to {args.out}: review them, then `python -m pipeline train --feedback {args.out}`")
    return 0


def _train(args: argparse.Namespace) -> int:
    from pipeline import distributed
    from pipeline.config import load_config
    from pipeline.data import resolve_spec
    from pipeline.stop import StopSignals

    stop = StopSignals().install()  # SIGTERM as Ctrl-C, and neither inside the commit
    cfg = load_config(args.config, args.overrides)
    spec = resolve_spec(args.data, cfg.data.source, cfg.data.path)
    role = distributed.role_for(cfg.training.strategy)
    quiet.import_tensorflow()
    from pipeline.job import run_training, run_worker

    if not role.is_chief:
        trained = run_worker(cfg, spec, role)
        print(json.dumps({"task": role.cluster.task, "role": "worker", "epochs_run": trained.epochs_run}))
        return 0
    if args.feedback is not None:
        from pipeline.feedback import load_reviewed

        load_reviewed(args.feedback)  # a wrong path fails here, before any MLflow run starts
    result = run_training(cfg, spec, role=role, stop=stop, feedback=args.feedback)
    print(f"run id: {result.run_id}")
    print(f"model version: {result.model_version}")
    print(f"gate: {'promoted' if result.promoted else 'not promoted'} ({result.decision.reason})")
    print(
        json.dumps(
            {
                "run_id": result.run_id,
                "model_version": str(result.model_version),
                "test_accuracy": round(result.test_accuracy, 6),
                "promoted": result.promoted,
                "export_path": result.export_path,
            }
        )
    )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    quiet.import_tensorflow()
    from pipeline import data, evaluate, tracking

    tracking.require_existing_store()
    uri = args.model if args.model.startswith("models:/") else registry_uri(args.name, args.model)
    dataset = data.load(data.resolve_spec(args.data, "keras", None))
    images, labels = (dataset.x_test, dataset.y_test) if args.split == "test" else (dataset.x_train, dataset.y_train)
    accuracy = evaluate.registered_accuracy(uri, images, labels)
    print(f"{uri}: {args.split} accuracy {accuracy:.4f} on {len(labels)} images ({dataset.spec.describe()})")
    print(json.dumps({"model_uri": uri, "split": args.split, "accuracy": round(accuracy, 6), "images": len(labels)}))
    return 0


def _promote(args: argparse.Namespace) -> int:
    from pipeline import register, tracking

    tracking.require_existing_store()
    register.promote(args.name, args.version, args.alias)
    print(f"{args.name}@{args.alias} -> version {args.version}")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from pipeline.config import load_config, override_values
    from pipeline.data import resolve_spec
    from pipeline.errors import ConfigError
    from pipeline.search_space import load_space
    from pipeline.stop import StopSignals, exit_status

    if args.trials < 1:
        raise ConfigError("--trials must be at least 1")
    StopSignals().install()  # SIGTERM as Ctrl-C: the running trial fails, the finished ones stay
    space = load_space(args.space)
    config = args.config or space.base or DEFAULT_CONFIG
    fixed = override_values(config, args.overrides)
    if fixed:
        space = space.without(fixed)
        print(f"fixed for every trial (--set), not searched: {', '.join(f'{k}={v}' for k, v in fixed.items())}")
    space.check_against(config, args.overrides)
    quiet.import_tensorflow()
    from pipeline import tune

    study = tune.StudyPlan(
        name=args.study or space.path.stem,
        storage=args.storage or tune.default_storage(),
        config=config,
        space=space,
        overrides=args.overrides,
        objective=args.objective,
        seed=args.seed,
        fixed=fixed,
    )
    base = load_config(config, args.overrides)
    spec = resolve_spec(args.data, base.data.source, base.data.path)
    try:
        opened = tune.run_study(study, args.trials, spec, args.timeout)
    except KeyboardInterrupt as exc:
        finished = len(tune.finished_trials(study))
        print(
            f"interrupted ({exc or 'SIGINT'}): the running trial is marked FAILED; {finished} finished trial(s) stay in "
            f"study {study.name}, and the same command resumes it",
            file=sys.stderr,
        )
        return exit_status(exc)
    top = max(args.retrain_top, 1 if args.promote_best else 0)
    if not top:
        return 0
    return tune.retrain_top(opened, top, args.max_ms_per_image, args.retrain_set, args.data, args.write_config)


def _recover(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pipeline import recover, tracking
    from pipeline.config import load_config

    tracking.require_existing_store()
    cfg = load_config(args.config, [])
    fixes = recover.recover(cfg.registry.model_name, cfg.registry.experiment, Path(cfg.export.base_dir), args.stale_after)
    if not fixes:
        print(f"recover: nothing to do ({tracking.tracking_uri()})")
    return 0
