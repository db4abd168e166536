"""Throughput of single-image ``POST /predict`` with adaptive batching on and off (a script, not a test).

    python scripts/measure_batching.py --model-uri exports/mnist [--connections 64] [--duration 20]

Starts the service twice on a free loopback port (batching on: the defaults; off: BATCHING=off),
drives each with ``wrk`` (Debian package ``wrk``: a C load generator, light on the shared CPU) from
64 closed-loop connections sending one real MNIST digit per request, and prints requests/s, p50/p99
latency, non-2xx answers and the CPU the load generator itself used.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from harness.launcher import start_service, stop_service  # noqa: E402

SAMPLE_NPZ = REPO / "tests" / "fixtures" / "mnist-sample.npz"

LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("{body}", "r"); wrk.body = f:read("*a"); f:close()
"""


def run_wrk(url: str, connections: int, duration: int, lua: Path) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    out = subprocess.run(
        ["wrk", "-t", "1", "-c", str(connections), "-d", f"{duration}s", "--latency", "-s", str(lua), f"{url}/predict"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)

    def latency_ms(label: str) -> float:
        value, unit = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)$", out, re.M).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)$", out, re.M)
    return {
        "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": latency_ms("50"),
        "p99_ms": latency_ms("99"),
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": errors.group(1) if errors else "none",
        "wrk_cpu_percent_of_one_core": round(100 * cpu / wall, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", required=True, help="MODEL_URI for the service (registry URI or local export)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=int, default=20)
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="extra service setting for both runs, e.g. ACCESS_LOG=off"
    )
    args = parser.parse_args()

    with np.load(SAMPLE_NPZ) as sample:
        digit = sample["x_test"][0]
    workdir = Path(tempfile.mkdtemp(prefix="measure-batching-"))
    body = workdir / "digit.json"
    body.write_text(json.dumps(digit.tolist()))
    lua = workdir / "post.lua"
    lua.write_text(LUA.format(body=body))

    extra = dict(item.split("=", 1) for item in args.env)
    results = {}
    for mode, env in {"batching on": {}, "batching off": {"BATCHING": "off"}}.items():
        service = start_service(
            {"MODEL_URI": args.model_uri, "MODEL_POLL_SECONDS": "0", **extra, **env},
            workdir / f"{mode.replace(' ', '-')}.log",
            cwd=Path.cwd(),
        )
        try:
            assert (
                requests.post(
                    f"{service.url}/predict", data=body.read_bytes(), headers={"Content-Type": "application/json"}, timeout=30
                ).status_code
                == 200
            )
            run_wrk(service.url, args.connections, 3, lua)  # warm-up
            results[mode] = run_wrk(service.url, args.connections, args.duration, lua)
        finally:
            stop_service(service)
        print(mode, json.dumps(results[mode]), flush=True)

    on, off = results["batching on"], results["batching off"]
    print(f"\n{args.connections} connections, {args.duration}s each, {os.cpu_count()} CPUs shared by server and wrk")
    print(f"{'mode':<14} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} {'wrk CPU %':>10}")
    for mode, r in results.items():
        print(
            f"{mode:<14} {r['requests_per_s']:>8.0f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['non_2xx']:>8} "
            f"{r['wrk_cpu_percent_of_one_core']:>10.1f}"
        )
    print(f"batching raises throughput {on['requests_per_s'] / off['requests_per_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
