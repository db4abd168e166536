"""Tuning benchmark (a script, not a test): a sweep of at most an hour, then the chosen trial trained
through the normal job, against the targets for a new champion.

    python scripts/benchmark_tuning.py --data ../shared/data/mnist-dev.npz [--timeout 3600] [--workdir DIR]
                                       [--space fast] [--set data.train_limit=15000] [--retrain-set epochs=40]

Runs ``python -m pipeline tune`` (the ``fast`` space on a 15,000-image subset by default; its own SQLite
MLflow store and study in the work directory, unless MLFLOW_TRACKING_URI/OPTUNA_STORAGE are set), then
retrains the best trial within the serving budget on all the training data through the job and the
gate (``--retrain-top 1``), then measures the registered model: test accuracy on the data's test split,
training time, ms/image at batch 256 through its SavedModel. Prints the trial counts, the Pareto front
and the verdict as Markdown; exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TARGETS = {"test_accuracy": 0.996, "ms_per_image": 0.05, "training_s": 600.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--timeout", type=float, default=3600, help="sweep budget in seconds [3600]")
    parser.add_argument("--trials", type=int, default=500, help="upper bound on trials [500: the timeout decides]")
    parser.add_argument("--workdir", type=Path, default=Path(f"bench-results/tuning-{time.strftime('%Y%m%dT%H%M%S')}"))
    parser.add_argument("--study", default="benchmark")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--space", default="fast")
    parser.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE", help="[data.train_limit=15000]")
    parser.add_argument("--retrain-set", action="append", metavar="KEY=VALUE", help="[epochs=40]")
    args = parser.parse_args()
    args.overrides = args.overrides if args.overrides is not None else ["data.train_limit=15000"]
    args.retrain_set = args.retrain_set if args.retrain_set is not None else ["epochs=40"]
    args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = args.workdir.resolve()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    common = ["--space", args.space, "--study", args.study, "--data", args.data, "--seed", str(args.seed)]
    common += [arg for override in args.overrides for arg in ("--set", override)]

    started = time.monotonic()
    tune = [sys.executable, "-m", "pipeline", "tune", "--trials", str(args.trials), "--timeout", str(args.timeout), *common]
    sweep = subprocess.run(tune, cwd=workdir, env=env)
    sweep_s = time.monotonic() - started
    if sweep.returncode != 0:
        print(f"the sweep failed (exit {sweep.returncode})", file=sys.stderr)
        return 2

    import optuna

    from pipeline.tune import choose, pareto_front, sqlalchemy_url

    storage = env.get("OPTUNA_STORAGE") or f"sqlite:///{workdir / 'optuna.db'}"
    study = optuna.load_study(study_name=args.study, storage=sqlalchemy_url(storage))
    front = pareto_front(study)
    try:
        chosen, budget = choose(study, TARGETS["ms_per_image"])[0], TARGETS["ms_per_image"]
    except Exception:
        chosen, budget = choose(study)[0], None  # nothing within the budget: take the most accurate
    config = workdir / "chosen.yaml"
    finished = sum(t.state.is_finished() and t.state.name != "FAIL" for t in study.trials)
    promote = [sys.executable, "-m", "pipeline", "tune", "--trials", str(finished), *common]  # no new trials
    promote += ["--retrain-top", "1", "--write-config", str(config)]
    promote += [arg for override in args.retrain_set for arg in ("--retrain-set", override)]
    if budget is not None:
        promote += ["--max-ms-per-image", str(budget)]
    trained = subprocess.run(promote, cwd=workdir, env=env, capture_output=True, text=True)
    sys.stdout.write(trained.stdout[-4000:])
    if trained.returncode != 0:
        print(trained.stderr[-3000:], file=sys.stderr)
        return 2
    result = json.loads(trained.stdout.strip().splitlines()[-1])
    figures = measure(result, env, workdir)
    print(report(args, study, front, chosen, budget, sweep_s, result, figures))
    met = (
        figures["test_accuracy"] >= TARGETS["test_accuracy"]
        and figures["ms_per_image"] <= TARGETS["ms_per_image"]
        and figures["training_s"] <= TARGETS["training_s"]
    )
    return 0 if met else 1


def measure(result: dict, env: dict[str, str], workdir: Path) -> dict[str, float]:
    import mlflow
    import numpy as np

    from pipeline.cost import ms_per_image

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    run = mlflow.get_run(result["run_id"])
    with np.load(run.data.params["data.path"]) as data:
        images = data["x_test"][:256]
    return {
        "test_accuracy": result["test_accuracy"],
        "training_s": float(run.data.metrics["training_wall_time_s"]),
        "ms_per_image": ms_per_image(workdir / result["export_path"], images, repeats=21),
    }


def report(args, study, front, chosen, budget, sweep_s, result, figures) -> str:
    states = [t.state.name for t in study.trials]
    lines = [
        "# Tuning benchmark",
        "",
        f"`python scripts/benchmark_tuning.py --data {args.data} --timeout {args.timeout:.0f}` — "
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs.",
        "",
        f"Sweep: {sweep_s / 60:.1f} min, {len(states)} trials ({states.count('COMPLETE')} complete, "
        f"{states.count('PRUNED')} pruned, {states.count('FAIL')} failed).",
        "",
        "| trial | val accuracy | ms/image | parameters | MFLOPs | blocks (filters) | pooling | dense | epochs |",
        "| ---: | ---: | ---: | ---: | ---: | --- | --- | --- | ---: |",
    ]
    for trial in front:
        a, model = trial.user_attrs, trial.user_attrs["config"]["model"]
        filters = "/".join(str(b["filters"]) for b in model["conv_blocks"])
        lines.append(
            f"| {trial.number} | {a['val_accuracy']:.4f} | {a['ms_per_image']:.4f} | {a['parameters']:,} | "
            f"{a['flops'] / 1e6:.2f} | {len(model['conv_blocks'])}x{model['conv_blocks'][0]['convs']} ({filters}) | "
            f"{'global avg' if model['global_pooling'] else 'flatten'} | {model['dense_units']} | "
            f"{trial.user_attrs['config']['training']['epochs']} |"
        )
    within = f"within {budget} ms/image" if budget is not None else "none was within the budget: the most accurate"
    lines += [
        "",
        f"Chosen: trial {chosen.number} ({within}), trained through the job as version {result['model_version']} "
        f"({'promoted' if result['promoted'] else 'not promoted'}).",
        "",
        "| figure | measured | target |",
        "| --- | ---: | ---: |",
        f"| test accuracy | {figures['test_accuracy']:.4f} | >= {TARGETS['test_accuracy']} |",
        f"| ms/image at batch 256 | {figures['ms_per_image']:.4f} | <= {TARGETS['ms_per_image']} |",
        f"| training s | {figures['training_s']:.0f} | <= {TARGETS['training_s']:.0f} |",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
