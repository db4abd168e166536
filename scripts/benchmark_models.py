"""Model benchmark: what each config's model costs to serve and how accurate it is (a script, not a test).

    python scripts/benchmark_models.py --data ../shared/data/mnist-dev.npz [--configs seed champion] [--workdir DIR]

Trains each config through the real job (its own SQLite MLflow store in the work directory; a config
already trained there is reused), then measures, in this one process and one after another:

- dev test accuracy (the data file's test split) of the export as the pipeline writes it (folded);
- parameters and MFLOPs per image;
- images/s through ``serving_default`` at batch 1, 32 and 256 (median of ``--repeats`` calls after
  warm-up) for the plain export (batch norm as Keras runs it) and the folded one, with TensorFlow's
  defaults (fp32), and the ratio of each at batch 256 to the ``seed`` export in the same process;
- the folded export again under oneDNN's bfloat16 auto-mixed precision, in a child process (the option is
  process-wide), with its accuracy: what the service's ``MODEL_PRECISION=bf16`` gains on this CPU.

Rows are measured in rounds (every model once per round, ``--rounds`` rounds) and the median taken, so a
busy moment hits all models alike. Prints a Markdown table and the targets for a new champion.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BATCHES = (1, 32, 256)
TARGETS = {"test_accuracy": 0.996, "ratio_to_seed": 0.3, "training_s": 600.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="Keras-layout .npz (its test split is the dev test set)")
    parser.add_argument("--configs", nargs="+", default=["seed", "champion"], help="configs to compare (seed first)")
    parser.add_argument("--workdir", type=Path, default=Path("bench-results/models"))
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per measurement [30]")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all models [3]")
    parser.add_argument("--bf16-child", nargs=2, metavar=("EXPORT", "DATA"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bf16_child:
        return bf16_child(Path(args.bf16_child[0]), args.bf16_child[1], args.repeats)
    args.data = str(Path(args.data).resolve())  # the jobs run in the work directory
    if "seed" not in args.configs:
        args.configs.insert(0, "seed")
    args.workdir.mkdir(parents=True, exist_ok=True)
    trained = {config: train(config, args.data, args.workdir.resolve()) for config in args.configs}
    rows = measure(trained, args)
    print(report(args, rows))
    return 0


def train(config: str, data: str, workdir: Path) -> dict:
    """The job's JSON result for ``config``, training it unless this work directory has it already."""
    result_file = workdir / f"{Path(config).stem}.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"}
    command = [sys.executable, "-m", "pipeline", "train", "--config", config, "--data", data]
    command += ["--set", f"export.base_dir={workdir / 'exports'}", "--set", "registry.accuracy_floor=0"]
    print(f"training {config} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"training {config} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    run = mlflow.get_run(result["run_id"])
    result.update(config=config, training_s=float(run.data.metrics["training_wall_time_s"]), mlflow_db=str(workdir / "mlflow.db"))
    result_file.write_text(json.dumps(result))
    return result


def images_per_s(serve, pixels, batch: int, repeats: int) -> float:
    from pipeline.cost import images_per_s as measured

    return measured(serve, pixels[:batch], repeats, warmup=5)


def measure(trained: dict[str, dict], args) -> list[dict]:
    import mlflow
    import numpy as np
    import tensorflow as tf

    from contract import REGISTERED_MODEL, SIGNATURE
    from pipeline.cost import flops
    from pipeline.export import export_to_staging, predict_savedmodel

    with np.load(args.data) as data:
        x_test, y_test = data["x_test"], data["y_test"]
    pixels = np.resize(x_test, (max(BATCHES), *x_test.shape[1:]))
    models = {}
    for config, result in trained.items():
        mlflow.set_tracking_uri(f"sqlite:///{result['mlflow_db']}")
        keras_model = mlflow.keras.load_model(f"models:/{REGISTERED_MODEL}/{result['model_version']}")
        plain = export_to_staging(keras_model, args.workdir.resolve() / "plain" / config, fold=False)
        folded = Path(result["export_path"])
        folded = folded if folded.is_absolute() else args.workdir.resolve() / folded
        models[config] = {
            "result": result,
            "parameters": keras_model.count_params(),
            "mflops": flops(keras_model) / 1e6,
            "accuracy": float((predict_savedmodel(folded, x_test).argmax(1) == y_test).mean()),
            "plain": tf.saved_model.load(str(plain)).signatures[SIGNATURE.name],
            "folded": tf.saved_model.load(str(folded)).signatures[SIGNATURE.name],
            "folded_path": folded,
            "speed": {},
        }
    for _ in range(args.rounds):
        for model in models.values():
            for variant in ("plain", "folded"):
                for batch in BATCHES:
                    model["speed"].setdefault((variant, batch), []).append(
                        images_per_s(model[variant], pixels, batch, args.repeats)
                    )
    rows = []
    seed = models["seed"]
    for config, model in models.items():
        speed = {key: statistics.median(values) for key, values in model["speed"].items()}
        bf16 = json.loads(
            subprocess.run(
                [sys.executable, __file__, "--data", args.data, "--repeats", str(args.repeats), "--bf16-child",
                 str(model["folded_path"]), args.data],
                capture_output=True, text=True, check=True,
            ).stdout.strip().splitlines()[-1]
        )  # fmt: skip
        rows.append(
            {
                "config": config,
                "accuracy": model["accuracy"],
                "bf16_accuracy": bf16["accuracy"],
                "parameters": model["parameters"],
                "mflops": model["mflops"],
                "training_s": model["result"]["training_s"],
                "speed": speed,
                "bf16": {int(k): v for k, v in bf16["speed"].items()},
                "ratio": {
                    variant: speed[(variant, 256)] / statistics.median(seed["speed"][("folded", 256)])
                    for variant in ("plain", "folded")
                },
            }
        )
    return rows


def bf16_child(export: Path, data: str, repeats: int) -> int:
    """The folded export under oneDNN's bfloat16 auto-mixed precision: accuracy and images/s per batch."""
    import numpy as np
    import tensorflow as tf

    tf.config.optimizer.set_experimental_options({"auto_mixed_precision_onednn_bfloat16": True})
    from contract import SIGNATURE
    from pipeline.export import predict_savedmodel

    with np.load(data) as npz:
        x_test, y_test = npz["x_test"], npz["y_test"]
    accuracy = float((predict_savedmodel(export, x_test).argmax(1) == y_test).mean())
    serve = tf.saved_model.load(str(export)).signatures[SIGNATURE.name]
    pixels = np.resize(x_test, (max(BATCHES), *x_test.shape[1:]))
    speed = {batch: images_per_s(serve, pixels, batch, repeats) for batch in BATCHES}
    print(json.dumps({"accuracy": accuracy, "speed": speed}))
    return 0


def report(args, rows: list[dict]) -> str:
    lines = [
        "# Model benchmark",
        "",
        f"`python scripts/benchmark_models.py --data {args.data} --configs {' '.join(args.configs)}` — "
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs; median of {args.repeats} calls, {args.rounds} rounds.",
        "",
        "| config | dev acc. | params | MFLOPs | train s | variant | img/s b=1 | img/s b=32 | img/s b=256 | × seed b=256 |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        for variant in ("plain", "folded", "bf16"):
            speeds = [row["bf16"][b] if variant == "bf16" else row["speed"][(variant, b)] for b in BATCHES]
            accuracy = row["bf16_accuracy"] if variant == "bf16" else row["accuracy"]
            ratio = f"{row['ratio'][variant]:.2f}" if variant != "bf16" else "—"
            lines.append(
                f"| {row['config']} | {accuracy:.4f} | {row['parameters']:,} | {row['mflops']:.2f} | {row['training_s']:.0f} | "
                f"{variant} | {speeds[0]:,.0f} | {speeds[1]:,.0f} | {speeds[2]:,.0f} | {ratio} |"
            )
    lines += [
        "",
        f"Targets for a new champion: dev accuracy ≥ {TARGETS['test_accuracy']}, folded export at batch 256 ≥ "
        f"{TARGETS['ratio_to_seed']}× the seed's, training ≤ {TARGETS['training_s']:.0f} s.",
    ]
    for row in rows:
        if row["config"] == "seed":
            continue
        met = (
            row["accuracy"] >= TARGETS["test_accuracy"]
            and row["ratio"]["folded"] >= TARGETS["ratio_to_seed"]
            and row["training_s"] <= TARGETS["training_s"]
        )
        lines.append(f"- {row['config']}: {'met' if met else 'not met'}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
