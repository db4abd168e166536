"""How long the service takes to become ready, and what its processes cost: ``bentoml serve`` started
as the tests and the load tests start it (``harness.launcher.start_service``), timed until ``/readyz``
answers, then each process's CPU time and resident memory (psutil), then stopped.

    python scripts/measure_startup.py --model-uri models:/mnist-cnn@champion \\
        --tracking-uri sqlite:///mlflow.db --workers 1 --repeats 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness.launcher import start_service, stop_service  # noqa: E402


def measure(model_uri: str, tracking_uri: str, workers: int, log: Path) -> None:
    env = {"MODEL_URI": model_uri, "MLFLOW_TRACKING_URI": tracking_uri, "SERVICE_WORKERS": str(workers)}
    started = time.monotonic()
    running = start_service(env, log)
    ready_s = time.monotonic() - started
    try:
        if running.process.poll() is not None:
            raise SystemExit(f"the service exited with {running.process.returncode}:\n{running.log()[-2000:]}")
        main = psutil.Process(running.process.pid)
        total = 0.0
        for process in [main, *main.children(recursive=True)]:
            times = process.cpu_times()
            cpu = times.user + times.system
            total += cpu
            role = "main" if process.pid == main.pid else "worker"
            print(f"  {role:6} pid {process.pid}: CPU {cpu:5.1f} s, RSS {process.memory_info().rss // 2**20} MiB")
        print(f"ready in {ready_s:.1f} s, CPU {total:.1f} s in all")
    finally:
        stop_service(running)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-uri", default="models:/mnist-cnn@champion")
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        for attempt in range(1, args.repeats + 1):
            print(f"start {attempt}/{args.repeats}")
            measure(args.model_uri, args.tracking_uri, args.workers, Path(scratch) / f"service-{attempt}.log")


if __name__ == "__main__":
    main()
