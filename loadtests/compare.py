"""The same registered model, the same load, side by side: this service with batching on, with
batching off, and MLflow's scoring server (``mlflow models serve``).

    python -m loadtests.compare --model-uri models:/mnist-cnn/3 [--run-time 30s] [--write loadtests/RESULTS.md]

For each server: requests/s and p50/p99 at 64 closed-loop users sending single images (`steady`),
p99 in an open loop at a fixed rate (`rate`), images/s for 256-image requests (`batch`), the server's
peak RSS, and the CPU the load generator used (it shares the machine). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
from harness.launcher import start_mlflow_models_serve, start_service, stop_process  # noqa: E402
from loadtests.run import run_profile  # noqa: E402

SERVERS = {
    "service, batching on": {"env": {}, "users": {"steady": "SingleImageUser", "rate": "SingleImageUser", "batch": "BatchUser"}},
    "service, batching on, 2 workers": {
        "env": {"SERVICE_WORKERS": "2"},
        "users": {"steady": "SingleImageUser", "rate": "SingleImageUser", "batch": "BatchUser"},
    },
    "service, 2 workers, TF Serving REST (8 images a request)": {
        "env": {"SERVICE_WORKERS": "2"},
        "users": {"steady": "TFServingUser", "rate": "TFServingUser", "batch": "BatchUser"},
    },
    "service, 2 workers, gRPC": {
        "env": {"SERVICE_WORKERS": "2"},
        "users": {"steady": "GrpcUser", "rate": "GrpcUser", "batch": "BatchUser"},
    },
    "service, batching off": {
        "env": {"BATCHING": "off"},
        "users": {"steady": "SingleImageUser", "rate": "SingleImageUser", "batch": "BatchUser"},
    },
    "mlflow models serve": {
        "mlflow": True,
        "users": {"steady": "MlflowSingleUser", "rate": "MlflowSingleUser", "batch": "MlflowBatchUser"},
    },
}


class PeakRss:
    """Samples the resident memory of a process tree twice a second; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                root = psutil.Process(self.pid)
                total = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", required=True, help="a registered version, e.g. models:/mnist-cnn/3")
    parser.add_argument("--run-time", default="30s")
    parser.add_argument("--out", type=Path, default=HERE / "reports")
    parser.add_argument("--write", type=Path, help="also write the Markdown table here (e.g. loadtests/RESULTS.md)")
    args = parser.parse_args()
    out = args.out / f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-compare"
    out.mkdir(parents=True)

    rows = {}
    for name, spec in SERVERS.items():
        slug = name.replace(",", "").replace(" ", "-")
        if spec.get("mlflow"):
            server = start_mlflow_models_serve(args.model_uri, out / f"{slug}.log", cwd=Path.cwd())
        else:
            server = start_service(
                {"MODEL_URI": args.model_uri, "MODEL_POLL_SECONDS": "0", **spec["env"]}, out / f"{slug}.log", cwd=Path.cwd()
            )
        if server.process.poll() is not None:
            raise RuntimeError(f"{name} did not start:\n{server.log()[-2000:]}")
        rss = PeakRss(server.process.pid)
        try:
            results = {
                profile: run_profile(
                    profile,
                    server.url,
                    out / slug,
                    user_classes=[spec["users"][profile]],
                    run_time=args.run_time,
                    grpc_target=server.grpc_target,
                ).stats
                for profile in ("steady", "rate", "batch")
            }
        finally:
            peak = rss.stop()
            stop_process(server)
        rows[name] = {**results, "peak_rss_mib": peak / 2**20}
        print(name, json.dumps(rows[name]), flush=True)

    table = markdown(rows, args)
    print(table)
    if args.write:
        args.write.write_text(table)
    return 0


def _answered_per_s(stats: dict) -> float:
    """Requests/s that got a correct answer: failures (e.g. 503 when overloaded) carry no images."""
    return stats["requests_per_s"] * (1 - stats["failure_ratio"])


def markdown(rows: dict, args: argparse.Namespace) -> str:
    batched = rows["service, batching on"]["steady"]["requests_per_s"]
    lines = [
        "# Serving benchmark",
        "",
        f"`python -m loadtests.compare --model-uri {args.model_uri} --run-time {args.run_time}` — "
        f"{datetime.now(UTC):%Y-%m-%d}, {platform.machine()}, {os.cpu_count()} CPUs shared by the servers and Locust.",
        "",
        "| server | 64 users: req/s | p50 ms | p99 ms | failures | open loop at 500 req/s: achieved req/s | p99 ms "
        "| 256-image requests: images/s | peak RSS MiB | Locust CPU (cores) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows.items():
        steady, rate, batch = r["steady"], r["rate"], r["batch"]
        lines.append(
            f"| {name} | {steady['requests_per_s']:.0f} | {steady['p50_ms']:.0f} | {steady['p99_ms']:.0f} | "
            f"{steady['failures'] + rate['failures'] + batch['failures']} | "
            f"{rate['requests_per_s']:.0f} | {rate['p99_ms']:.0f} | "
            f"{_answered_per_s(batch) * 256:.0f} | {r['peak_rss_mib']:.0f} | {steady['load_generator_cpu_cores']:.2f} |"
        )
    mlflow_rps = rows["mlflow models serve"]["steady"]["requests_per_s"]
    off_rps = rows["service, batching off"]["steady"]["requests_per_s"]
    lines += [
        "",
        f"Batching on vs off: {batched / off_rps:.2f}x requests/s; this service vs `mlflow models serve`: "
        f"{batched / mlflow_rps:.1f}x.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
