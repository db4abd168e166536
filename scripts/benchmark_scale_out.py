"""Scale-out benchmark (a script, not a test): what the load balancer costs, and multi-worker training.

    python scripts/benchmark_scale_out.py --model-uri exports/mnist [--duration 15] [--repeats 2]
                                          [--training-data ../shared/data/mnist-dev.npz] [--epochs 2]

Serving, on the same machine and model, single-image JSON requests on ``/predict`` from ``wrk`` with
64 connections (its CPU reported): nginx (Debian's, the compose site config) in front of 2
single-worker ``bentoml serve`` replicas, against 1 replica with 2 workers (``SERVICE_WORKERS=2``),
the designs alternating ``--repeats`` times. Training: the ``seed`` config for ``--epochs`` epochs on
``--training-data``, default strategy vs 2 multi-worker processes on loopback, in training images/s.

Prints Markdown tables and writes ``bench-results/scale-out-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
from benchmark_serving import wrk  # noqa: E402

from harness.launcher import child_env, free_port, start_nginx, start_service, stop_process  # noqa: E402

SAMPLE_NPZ = REPO / "tests" / "fixtures" / "mnist-sample.npz"


def serving(model_uri: str, duration: int, repeats: int, workdir: Path) -> list[dict]:
    with np.load(SAMPLE_NPZ) as npz:
        body = workdir / "one.json"
        body.write_text(json.dumps(npz["x_test"][:1].tolist()))
    env = {"MODEL_URI": model_uri}
    rows = []
    for repeat in range(repeats):
        for design in ("nginx + 2 replicas x 1 worker", "1 replica x 2 workers"):
            started = []
            try:
                if design.startswith("nginx"):
                    replicas = [
                        start_service({**env, "SERVICE_WORKERS": "1"}, workdir / f"r{repeat}-{n}" / "log") for n in (0, 1)
                    ]
                    started += replicas
                    balancer = start_nginx(
                        [r.url.removeprefix("http://") for r in replicas],
                        [r.grpc_target for r in replicas],
                        workdir / f"nginx-{repeat}",
                    )
                    started.append(balancer)
                    url = balancer.url
                else:
                    single = start_service({**env, "SERVICE_WORKERS": "2"}, workdir / f"single-{repeat}" / "log")
                    started.append(single)
                    url = single.url
                for running in started:
                    assert running.process.poll() is None, running.log()[-2000:]
                wrk(f"{url}/predict", body, 3, workdir)  # warm-up
                result = wrk(f"{url}/predict", body, duration, workdir)
            finally:
                for running in started:
                    stop_process(running)
            rows.append({"design": design, "repeat": repeat + 1, **result})
            print(
                f"| {design} | {repeat + 1} | {result['rps']:.0f} | {result['p50_ms']:.1f} | {result['p99_ms']:.1f} | "
                f"{result['errors']} | {result['generator_cpu']:.2f} |",
                flush=True,
            )
    return rows


def training(data: str, epochs: int, workdir: Path) -> list[dict]:
    base = [
        "-m",
        "pipeline",
        "train",
        "--config",
        "seed",
        "--data",
        data,
        "--set",
        f"epochs={epochs}",
        "--set",
        "registry.accuracy_floor=0",
    ]
    rows = []
    for strategy in ("default", "multi_worker"):
        run_dir = workdir / f"train-{strategy}"
        env = {"MLFLOW_TRACKING_URI": f"sqlite:///{run_dir / 'chief' / 'mlflow.db'}", "TF_CONFIG": ""}
        args = [*base, "--set", f"export.base_dir={run_dir / 'chief' / 'exports'}", "--set", f"training.strategy={strategy}"]
        workers = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"] if strategy == "multi_worker" else [None]
        procs = []
        started = time.perf_counter()
        for index, _ in enumerate(workers):
            cwd = run_dir / ("chief" if index == 0 else f"worker-{index}")
            cwd.mkdir(parents=True, exist_ok=True)
            task_env = dict(env)
            if strategy == "multi_worker":
                task_env["TF_CONFIG"] = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
            log = (cwd / "train.log").open("w")
            procs.append(
                subprocess.Popen([sys.executable, *args], cwd=cwd, env=child_env(task_env), stdout=log, stderr=subprocess.STDOUT)
            )
        codes = [proc.wait(timeout=3600) for proc in procs]
        wall = time.perf_counter() - started
        out = (run_dir / "chief" / "train.log").read_text()
        assert codes == [0] * len(procs), out[-3000:]
        seconds = float(re.search(r"trained \d+ epochs on \d+ replica\(s\) in ([\d.]+)s", out).group(1))
        images = int(re.search(r"on ([\d,]+) images", out).group(1).replace(",", ""))
        accuracy = float(re.search(r"test accuracy ([\d.]+)", out).group(1))
        row = {
            "strategy": strategy,
            "processes": len(procs),
            "train_s": seconds,
            "images_per_s": round(epochs * images / seconds),
            "job_wall_s": round(wall, 1),
            "test_accuracy": accuracy,
        }
        rows.append(row)
        print(
            f"| {strategy} | {len(procs)} | {seconds:.1f} | {row['images_per_s']:,} | {wall:.0f} | {accuracy:.4f} |", flush=True
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model-uri", required=True, help="what the replicas serve (MODEL_URI): a models:/ URI or an export directory"
    )
    parser.add_argument("--duration", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--training-data", help="an MNIST .npz for the training comparison (skipped without it)")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    results: dict = {"machine": f"{os.cpu_count()} CPU cores", "connections": 64}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        print("| design | run | req/s | p50 ms | p99 ms | errors | wrk CPU (cores) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        results["serving"] = serving(args.model_uri, args.duration, args.repeats, workdir)
        if args.training_data:
            print("\n| strategy | processes | training s | images/s | job wall s | test accuracy |")
            print("| --- | ---: | ---: | ---: | ---: | ---: |")
            results["training"] = training(args.training_data, args.epochs, workdir)
    out = REPO / "bench-results" / f"scale-out-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
