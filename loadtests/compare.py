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
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
from service.launcher import child_env, free_port, start_service, stop_service  # noqa: E402

SERVERS = {
    "service, batching on": {"env": {}, "users": {"steady": "SingleImageUser", "rate": "SingleImageUser", "batch": "BatchUser"}},
    "service, batching on, 2 workers": {"env": {"SERVICE_WORKERS": "2"},
                                        "users": {"steady": "SingleImageUser", "rate": "SingleImageUser", "batch": "BatchUser"}},
    "service, 2 workers, TF Serving REST (8 images a request)": {
        "env": {"SERVICE_WORKERS": "2"}, "users": {"steady": "TFServingUser", "rate": "TFServingUser", "batch": "BatchUser"}},
    "service, 2 workers, gRPC": {"env": {"SERVICE_WORKERS": "2"},
                                 "users": {"steady": "GrpcUser", "rate": "GrpcUser", "batch": "BatchUser"}},
    "service, batching off": {"env": {"BATCHING": "off"},
                              "users": {"steady": "SingleImageUser", "rate": "SingleImageUser", "batch": "BatchUser"}},
    "mlflow models serve": {"mlflow": True,
                            "users": {"steady": "MlflowSingleUser", "rate": "MlflowSingleUser", "batch": "MlflowBatchUser"}},
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


def start_mlflow_serve(model_uri: str, log_path: Path) -> tuple[str, subprocess.Popen]:
    port = free_port()
    with log_path.open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
                                    "--host", "127.0.0.1", "--port", str(port)], env=child_env(), stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited:\n{log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2):
                return url, process
        except OSError:
            time.sleep(1)
    raise TimeoutError("mlflow models serve did not come up")


def run_profile(profile: str, url: str, user_class: str, run_time: str, out: Path, grpc_target: str | None) -> dict:
    sys.path.insert(0, str(REPO))
    from loadtests import run as runner

    profiles = runner.load_profiles()
    profiles[profile]["run_time"] = run_time
    runner.load_profiles = lambda: profiles
    runner.main([profile, "--host", url, "--user-class", user_class, "--out", str(out),
                 *(["--grpc-target", grpc_target] if grpc_target else [])])
    latest = max((p for p in out.iterdir() if p.name.endswith(f"-{profile}")), key=lambda p: p.name)
    return json.loads((latest / "summary.json").read_text())["stats"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", required=True, help="a registered version, e.g. models:/mnist-cnn/3")
    parser.add_argument("--run-time", default="30s")
    parser.add_argument("--out", type=Path, default=HERE / "reports")
    parser.add_argument("--write", type=Path, help="also write the Markdown table here (e.g. loadtests/RESULTS.md)")
    args = parser.parse_args()
    out = args.out / f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-compare"
    out.mkdir(parents=True)

    rows = {}
    for name, spec in SERVERS.items():
        slug = name.replace(",", "").replace(" ", "-")
        if spec.get("mlflow"):
            url, process = start_mlflow_serve(args.model_uri, out / f"{slug}.log")
            grpc_target = None
            stop = lambda: (os.killpg(process.pid, 15), process.wait(timeout=30))  # noqa: E731
        else:
            service = start_service({"MODEL_URI": args.model_uri, "MODEL_POLL_SECONDS": "0", **spec["env"]},
                                    out / f"{slug}.log", cwd=Path.cwd())
            url, process, stop = service.url, service.process, lambda: stop_service(service)  # noqa: E731
            grpc_target = service.grpc_target
        rss = PeakRss(process.pid)
        try:
            results = {profile: run_profile(profile, url, spec["users"][profile], args.run_time, out / slug, grpc_target)
                       for profile in ("steady", "rate", "batch")}
        finally:
            peak = rss.stop()
            stop()
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
        "# Serving benchmark", "",
        f"`python -m loadtests.compare --model-uri {args.model_uri} --run-time {args.run_time}` — "
        f"{datetime.now(timezone.utc):%Y-%m-%d}, {platform.machine()}, {os.cpu_count()} CPUs shared by the servers and Locust.", "",
        "| server | 64 users: req/s | p50 ms | p99 ms | failures | open loop at 500 req/s: achieved req/s | p99 ms | 256-image requests: images/s | peak RSS MiB | Locust CPU (cores) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows.items():
        steady, rate, batch = r["steady"], r["rate"], r["batch"]
        lines.append(
            f"| {name} | {steady['requests_per_s']:.0f} | {steady['p50_ms']:.0f} | {steady['p99_ms']:.0f} | "
            f"{steady['failures'] + rate['failures'] + batch['failures']} | {rate['requests_per_s']:.0f} | {rate['p99_ms']:.0f} | "
            f"{_answered_per_s(batch) * 256:.0f} | {r['peak_rss_mib']:.0f} | {steady['load_generator_cpu_cores']:.2f} |"
        )
    mlflow_rps = rows["mlflow models serve"]["steady"]["requests_per_s"]
    off_rps = rows["service, batching off"]["steady"]["requests_per_s"]
    lines += ["", f"Batching on vs off: {batched / off_rps:.2f}x requests/s; this service vs `mlflow models serve`: "
                  f"{batched / mlflow_rps:.1f}x.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
