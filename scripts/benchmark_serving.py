"""Serving benchmark: HTTP JSON, TF Serving and V2 REST and gRPC, closed and open loop (a script, not a test).

    python scripts/benchmark_serving.py --model-uri exports/mnist [--duration 15]
                                        [--workers 1,2] [--repeats 3] [--protocol-repeats 1]
                                        [--open-loop 1000,2000] [--mlflow URI] [--reference DIR]

Starts ``bentoml serve service:Digits`` on free loopback ports for each worker
count, with Prometheus metrics and readiness on as always, and drives it with C load generators that
share the machine and whose own CPU is reported:
- closed loop: ``wrk`` (Debian ``wrk``), 64 connections of single-image requests on ``/predict``,
  ``/v1/models/mnist:predict`` and ``/v2/models/mnist/infer``; ``h2load`` (Debian ``nghttp2-client``) with
  64 gRPC connections on ``PredictionService/Predict`` and ``GRPCInferenceService/ModelInfer``. gRPC
  answers are checked for ``grpc-status: 0`` separately (h2load
  counts HTTP status only), by a stock stub before and after the load;
- open loop: ``h2load --rps`` with connections started one ``1/rate`` apart, so arrivals are evenly
  spaced, not bursts; latency from its per-request log;
- optionally ``mlflow models serve`` on the same model (``--mlflow models:/mnist-cnn/N``) for the ratio.
- optionally ``scripts/reference_server.py`` on the same SavedModel (``--reference DIR``): the same
  closed-loop ``/predict`` runs and open-loop rates, and the service / reference ratios.

Prints a Markdown table and writes ``bench-results/serving-<time>.json``. The targets (issue 8) are
printed beside the figures; nothing here fails on them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from contract import SERVABLE_NAME, SIGNATURE  # noqa: E402
from harness.launcher import (  # noqa: E402
    free_port,
    start_mlflow_models_serve,
    start_process,
    start_service,
    stop_process,
    stop_service,
)

SAMPLE_NPZ = REPO / "tests" / "fixtures" / "mnist-sample.npz"
CONNECTIONS = 64
LUA = (
    'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
    'local f = io.open("{body}", "rb"); wrk.body = f:read("*a"); f:close()\n'
)


def generator_cpu(command: list[str], **kwargs) -> tuple[str, float]:
    """Run a load generator; (its stdout, its CPU seconds per wall second)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, check=True, **kwargs).stdout
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return out, ((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)) / wall


def wrk(
    url: str, body: Path, duration: int, workdir: Path, connections: int = CONNECTIONS, server: subprocess.Popen | None = None
) -> dict:
    """Closed loop with wrk. With ``server`` (the server's top process), also its CPU per request (all its
    processes) and how many of the connections each worker holds, looked at mid-run."""
    lua = workdir / f"{body.stem}.lua"
    lua.write_text(LUA.format(body=body))
    command = [
        "wrk",
        "-t",
        "1",
        "-c",
        str(connections),
        "-d",
        f"{duration}s",
        "--timeout",
        "30s",
        "--latency",
        "-s",
        str(lua),
        url,
    ]
    split: list[int] = []
    cpu_before = server_cpu_s(server) if server else 0.0
    if server:
        port = int(url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
        sampler = threading.Timer(duration / 2, lambda: split.extend(connections_per_worker(server, port)))
        sampler.start()
    out, cpu = generator_cpu(command)
    server_cpu = server_cpu_s(server) - cpu_before if server else None

    def latency_ms(label: str) -> float:
        value, unit = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M).groups()
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]

    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)$", out, re.M)
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    return {
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": latency_ms("50"),
        "p99_ms": latency_ms("99"),
        "errors": (int(non_2xx.group(1)) if non_2xx else 0) + (1 if errors else 0),
        "generator_cpu": round(cpu, 2),
        **({"server_cpu_ms_per_request": round(1000 * server_cpu / max(requests, 1), 4), "split": split} if server else {}),
    }


def server_cpu_s(server: subprocess.Popen) -> float:
    """CPU seconds used so far by a server's process and all its descendants."""
    total = 0.0
    top = psutil.Process(server.pid)
    for process in [top, *top.children(recursive=True)]:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def connections_per_worker(server: subprocess.Popen, port: int) -> list[int]:
    """Established connections on ``port`` held by each of the server's processes that holds any."""
    counts = []
    for process in psutil.Process(server.pid).children(recursive=True):
        try:
            held = sum(1 for c in process.net_connections("tcp") if c.status == "ESTABLISHED" and c.laddr.port == port)
        except psutil.NoSuchProcess:
            continue
        if held:
            counts.append(held)
    return sorted(counts)


def h2load(
    url: str, body: Path, *, headers: list[str], h1: bool, workdir: Path, duration: int | None = None, rate: int | None = None
) -> dict:
    """Closed loop (``duration``: 64 connections, one request in flight each) or open loop (``rate``
    requests/s, evenly spaced: 50 connections at rate/50 each, started 1/rate apart)."""
    log = workdir / "h2load.log"
    log.unlink(missing_ok=True)  # h2load appends to its log
    command = ["h2load", "-d", str(body), "--log-file", str(log), *sum((["-H", h] for h in headers), [])]
    if h1:
        command.append("--h1")
    if rate:
        clients = 50
        total = rate * (duration or 10)
        per_ms = max(1, round(rate / 1000))  # h2load's rate period has millisecond steps
        command += [
            "-c",
            str(clients),
            "-m",
            "1",
            "--rps",
            f"{rate / clients:g}",
            "-n",
            str(total),
            "-r",
            str(per_ms),
            "--rate-period",
            f"{max(1, round(1000 * per_ms / rate))}ms",
        ]
    else:
        command += ["-c", str(CONNECTIONS), "-m", "1", "-D", f"{duration}s", "--warm-up-time", "1s"]
    out, cpu = generator_cpu(command + [url], timeout=600)
    rows = [line.split("\t") for line in log.read_text().splitlines() if line.strip()]
    starts = np.array([int(r[0]) for r in rows], dtype=np.int64)
    status = np.array([int(r[1]) for r in rows])
    latency_ms = np.array([int(r[2]) for r in rows]) / 1000
    span_s = (starts.max() - starts.min()) / 1e6 if len(rows) > 1 else 1.0
    failed = int(re.search(r"(\d+) failed", out).group(1)) + int(re.search(r"(\d+) errored", out).group(1))
    return {
        "rps": round(len(rows) / span_s, 1),
        "p50_ms": round(float(np.percentile(latency_ms, 50)), 2),
        "p99_ms": round(float(np.percentile(latency_ms, 99)), 2),
        "errors": failed + int((status != 200).sum()),
        "generator_cpu": round(cpu, 2),
        **({"offered_rps": rate} if rate else {}),
    }


def grpc_frame(pixels: np.ndarray) -> bytes:
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = SERVABLE_NAME
    tensor = request.inputs[SIGNATURE.input]
    tensor.dtype = 4  # DT_UINT8
    for size in pixels.shape:
        tensor.tensor_shape.dim.add().size = size
    tensor.tensor_content = pixels.tobytes()
    message = request.SerializeToString()
    return b"\x00" + struct.pack(">I", len(message)) + message


def v2_grpc_frame(pixels: np.ndarray) -> bytes:
    from service.protos import open_inference_pb2 as v2

    request = v2.ModelInferRequest(model_name=SERVABLE_NAME, raw_input_contents=[pixels.tobytes()])
    request.inputs.add(name=SIGNATURE.input, datatype="UINT8", shape=pixels.shape)
    message = request.SerializeToString()
    return b"\x00" + struct.pack(">I", len(message)) + message


def v2_rest_body(pixels: np.ndarray) -> str:
    tensor = {"name": SIGNATURE.input, "datatype": "UINT8", "shape": list(pixels.shape), "data": pixels.ravel().tolist()}
    return json.dumps({"inputs": [tensor]}, separators=(",", ":"))


def grpc_answers_right(target: str, images: np.ndarray, labels: np.ndarray, protocol: str = "tfserving") -> bool:
    from service.client import GrpcClient, V2GrpcClient

    with (V2GrpcClient if protocol == "v2" else GrpcClient)(target) as client:
        digits = [a.digit for a in client.predict(images)]
    return float(np.mean(np.array(digits) == labels)) >= 0.8


def show(row: dict) -> dict:
    """Print a finished row at once (a long run that fails later keeps what it measured)."""
    print(
        f"| {row['server']} | {row['route']} | {row['load']} | {row['repeat']} | {row['rps']:,.0f} | {row['p50_ms']:.1f} | "
        f"{row['p99_ms']:.1f} | {row['errors']} | {row['generator_cpu']:.2f} |"
        + (
            f" server CPU {row['server_cpu_ms_per_request']:.3f} ms/request, connections per worker {row['split']}"
            if "split" in row
            else ""
        ),
        flush=True,
    )
    return row


def bench_service(
    model_uri: str,
    workers: int,
    args: argparse.Namespace,
    bodies: dict[str, Path],
    sample: tuple[np.ndarray, np.ndarray],
    workdir: Path,
) -> list[dict]:
    grpc_port = free_port()
    env = {
        "MODEL_URI": model_uri,
        "SERVICE_WORKERS": str(workers),
        "MODEL_POLL_SECONDS": "0",
        "GRPC_PORT": str(grpc_port),
        "GRPC_HOST": "127.0.0.1",
    }
    if args.tracking_uri:
        env["MLFLOW_TRACKING_URI"] = args.tracking_uri
    env.update(dict(setting.split("=", 1) for setting in args.env))
    service = start_service(env, workdir / f"service-{workers}.log")
    rows = []
    try:
        if service.process.poll() is not None:
            raise SystemExit(f"service did not start:\n{service.log()[-2000:]}")
        label = f"service, {workers} worker{'s' if workers > 1 else ''}"
        for repeat in range(args.repeats):
            rows.append(
                show(
                    {
                        "server": label,
                        "route": "/predict",
                        "load": "64 conns",
                        "repeat": repeat + 1,
                        **wrk(f"{service.url}/predict", bodies["json"], args.duration, workdir, server=service.process),
                    }
                )
            )
        if args.bulk:  # bulk requests: the model call, not the front, is the limit
            bulk = wrk(f"{service.url}/predict", bodies["bulk"], args.duration, workdir, connections=8, server=service.process)
            bulk["images_per_s"] = bulk["rps"] * args.bulk
            rows.append(
                show({"server": label, "route": "/predict", "load": f"8 conns x {args.bulk} images", "repeat": 1, **bulk})
            )
        target = f"127.0.0.1:{grpc_port}"
        grpc_headers = ["content-type: application/grpc", "te: trailers"]
        for repeat in range(args.protocol_repeats):  # the other protocols' single-image routes, interleaved
            for route, url, body in (
                ("TF REST :predict", f"{service.url}/v1/models/mnist:predict", bodies["tf"]),
                ("V2 REST infer", f"{service.url}/v2/models/mnist/infer", bodies["v2"]),
            ):
                result = wrk(url, body, args.duration, workdir, server=service.process)
                rows.append(show({"server": label, "route": route, "load": "64 conns", "repeat": repeat + 1, **result}))
            for route, method, body, protocol in (
                ("gRPC Predict", "tensorflow.serving.PredictionService/Predict", bodies["grpc"], "tfserving"),
                ("V2 gRPC ModelInfer", "inference.GRPCInferenceService/ModelInfer", bodies["v2_grpc"], "v2"),
            ):
                right_before = grpc_answers_right(target, *sample, protocol=protocol)
                result = h2load(
                    f"http://{target}/{method}", body, headers=grpc_headers, h1=False, workdir=workdir, duration=args.duration
                )
                right = right_before and grpc_answers_right(target, *sample, protocol=protocol)
                row = {"server": label, "route": route, "load": "64 conns", "repeat": repeat + 1, **result}
                rows.append(show({**row, "checked_right": right}))
        rows += open_loop(label, service.url, args, bodies, workdir)
    finally:
        stop_service(service)
    return rows


def open_loop(label: str, url: str, args: argparse.Namespace, bodies: dict[str, Path], workdir: Path) -> list[dict]:
    """One open-loop run of single-image ``/predict`` requests per rate in ``--open-loop``."""
    return [
        show(
            {
                "server": label,
                "route": "/predict",
                "load": f"open loop {rate}/s",
                "repeat": 1,
                **h2load(
                    f"{url}/predict",
                    bodies["json"],
                    headers=["content-type: application/json"],
                    h1=True,
                    workdir=workdir,
                    duration=args.duration,
                    rate=rate,
                ),
            }
        )
        for rate in args.open_loop
    ]


def bench_reference(
    model_path: str, workers: int, args: argparse.Namespace, bodies: dict[str, Path], workdir: Path
) -> list[dict]:
    """``scripts/reference_server.py`` on the same SavedModel: the floor the service's features sit on."""
    port = free_port()
    command = [sys.executable, str(REPO / "scripts" / "reference_server.py"), "--model", model_path, "--port", str(port)]
    command += ["--workers", str(workers)]
    server = start_process(command, f"http://127.0.0.1:{port}", "/healthz", workdir / f"reference-{workers}.log")
    try:
        if server.process.poll() is not None:
            raise SystemExit(f"reference server did not start:\n{server.log()[-2000:]}")
        time.sleep(3)  # every worker up, not just the first
        label = f"reference, {workers} worker{'s' if workers > 1 else ''}"
        rows = [
            show(
                {
                    "server": label,
                    "route": "/predict",
                    "load": "64 conns",
                    "repeat": repeat + 1,
                    **wrk(f"{server.url}/predict", bodies["json"], args.duration, workdir, server=server.process),
                }
            )
            for repeat in range(args.repeats)
        ]
        if args.bulk:
            bulk = wrk(f"{server.url}/predict", bodies["bulk"], args.duration, workdir, connections=8, server=server.process)
            bulk["images_per_s"] = bulk["rps"] * args.bulk
            rows.append(
                show({"server": label, "route": "/predict", "load": f"8 conns x {args.bulk} images", "repeat": 1, **bulk})
            )
        return rows + open_loop(label, server.url, args, bodies, workdir)
    finally:
        stop_process(server)


def compare_with_reference(rows: list[dict]) -> None:
    """Service / reference ratios for each worker count (targets, issue 20: throughput >= 0.95x with the
    champion, >= 0.8x with the seed; p99 <= 1.5x; CPU per request <= 1.2x)."""
    for workers in sorted({r["server"].split(", ")[-1] for r in rows if r["server"].startswith("reference")}):
        ours = [r for r in rows if r["server"] == f"service, {workers}" and r["load"] == "64 conns" and r["route"] == "/predict"]
        reference = [r for r in rows if r["server"] == f"reference, {workers}" and r["load"] == "64 conns"]
        if not ours or not reference:
            continue

        def mean(runs: list[dict], key: str) -> float:
            return float(np.mean([r[key] for r in runs]))

        def each(runs: list[dict], key: str, fmt: str) -> str:
            return ", ".join(format(r[key], fmt) for r in runs)

        cpu = "server_cpu_ms_per_request"
        print(
            f"\nservice / reference, {workers}: throughput {mean(ours, 'rps') / mean(reference, 'rps'):.2f}x "
            f"(runs {each(ours, 'rps', ',.0f')} vs {each(reference, 'rps', ',.0f')} req/s); "
            f"p99 {mean(ours, 'p99_ms') / mean(reference, 'p99_ms'):.2f}x "
            f"({each(ours, 'p99_ms', '.1f')} vs {each(reference, 'p99_ms', '.1f')} ms); "
            f"CPU per request {mean(ours, cpu) / mean(reference, cpu):.2f}x "
            f"({each(ours, cpu, '.3f')} vs {each(reference, cpu, '.3f')} ms); "
            f"connections per worker {[r['split'] for r in ours]} vs {[r['split'] for r in reference]}"
        )
        for load in sorted({r["load"] for r in rows if r["load"].startswith("open loop")}):
            pair = [
                next((r for r in rows if r["server"] == f"{server}, {workers}" and r["load"] == load), None)
                for server in ("service", "reference")
            ]
            if None not in pair:
                print(
                    f"service / reference, {workers}, {load}: achieved {pair[0]['rps']:,.0f} vs {pair[1]['rps']:,.0f} "
                    f"req/s; p50 {pair[0]['p50_ms']:.1f} vs {pair[1]['p50_ms']:.1f} ms; p99 {pair[0]['p99_ms']:.1f} "
                    f"vs {pair[1]['p99_ms']:.1f} ms ({pair[0]['p99_ms'] / pair[1]['p99_ms']:.2f}x)"
                )


def bench_mlflow(model_uri: str, args: argparse.Namespace, body: Path, workdir: Path) -> dict:
    server = start_mlflow_models_serve(
        model_uri, workdir / "mlflow-serve.log", {"MLFLOW_TRACKING_URI": args.tracking_uri} if args.tracking_uri else None
    )
    try:
        if server.process.poll() is not None:
            raise RuntimeError(f"mlflow models serve did not start:\n{server.log()[-2000:]}")
        return {
            "server": "mlflow models serve",
            "route": "/invocations",
            "load": "64 conns",
            "repeat": 1,
            **wrk(f"{server.url}/invocations", body, args.duration, workdir),
        }
    finally:
        stop_process(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-uri", required=True)
    parser.add_argument("--tracking-uri", help="MLFLOW_TRACKING_URI for a models:/ URI")
    parser.add_argument("--duration", type=int, default=15)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--repeats", type=int, default=3, help="closed-loop /predict runs per server, for the spread")
    parser.add_argument("--open-loop", default="1000,2000", help="open-loop rates in requests/s ('' for none)")
    parser.add_argument("--mlflow", metavar="URI", help="also measure `mlflow models serve` on this model URI")
    parser.add_argument(
        "--reference", metavar="SAVEDMODEL", help="also run scripts/reference_server.py on this SavedModel directory"
    )
    parser.add_argument("--bulk", type=int, default=0, metavar="N", help="also 8 connections of N-image /predict requests")
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="a service setting, e.g. CHALLENGER_MODE=shadow"
    )
    parser.add_argument(
        "--protocol-repeats", type=int, default=1, help="runs of each other protocol (TF REST, V2 REST, TF gRPC, V2 gRPC)"
    )
    args = parser.parse_args()
    args.open_loop = [int(r) for r in args.open_loop.split(",") if r]
    for tool, package in (("wrk", "wrk"), ("h2load", "nghttp2-client")):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (Debian: apt-get install {package}); it generates the load")

    with np.load(SAMPLE_NPZ) as npz:
        images, labels = npz["x_test"][:64], npz["y_test"][:64]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        bodies = {
            "json": workdir / "one.json",
            "tf": workdir / "tf.json",
            "grpc": workdir / "one.grpc",
            "mlflow": workdir / "mlflow.json",
        }
        bodies["json"].write_text(json.dumps(images[0].tolist(), separators=(",", ":")))
        bodies["tf"].write_text(json.dumps({"instances": [images[0].tolist()]}, separators=(",", ":")))
        bodies["grpc"].write_bytes(grpc_frame(images[:1]))
        bodies["v2"] = workdir / "v2.json"
        bodies["v2"].write_text(v2_rest_body(images[:1]))
        bodies["v2_grpc"] = workdir / "v2.grpc"
        bodies["v2_grpc"].write_bytes(v2_grpc_frame(images[:1]))
        bodies["mlflow"].write_text(json.dumps({"inputs": images[:1, ..., None].astype(float).tolist()}))
        bodies["bulk"] = workdir / "bulk.json"
        bodies["bulk"].write_text(
            json.dumps(np.resize(images, (max(args.bulk, 1), *images.shape[1:])).tolist(), separators=(",", ":"))
        )
        print("| server | route | load | run | req/s | p50 ms | p99 ms | errors | generator CPU (cores) |", flush=True)
        for workers in (int(w) for w in args.workers.split(",")):
            print(f"== service, {workers} worker(s)", file=sys.stderr, flush=True)
            rows += bench_service(args.model_uri, workers, args, bodies, (images, labels), workdir)
        if args.reference:
            for workers in (int(w) for w in args.workers.split(",")):
                print(f"== reference server, {workers} worker(s)", file=sys.stderr, flush=True)
                rows += bench_reference(args.reference, workers, args, bodies, workdir)
        if args.mlflow:
            print("== mlflow models serve", file=sys.stderr, flush=True)
            rows.append(show(bench_mlflow(args.mlflow, args, bodies["mlflow"], workdir)))

    print(f"\nall rows: {os.cpu_count()} CPUs, {args.duration} s per run, single-image requests\n")
    print("| server | route | load | run | req/s | p50 ms | p99 ms | errors | generator CPU (cores) |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        rate = f"{r['rps']:,.0f}" + (f" ({r['images_per_s']:,.0f} images/s)" if "images_per_s" in r else "")
        print(
            f"| {r['server']} | {r['route']} | {r['load']} | {r['repeat']} | {rate} | {r['p50_ms']:.1f} | "
            f"{r['p99_ms']:.1f} | {r['errors']} | {r['generator_cpu']:.2f} |"
        )
    for server in sorted({r["server"] for r in rows if r["repeat"] > 1 or r["route"] == "/predict"}):
        runs = [r["rps"] for r in rows if r["server"] == server and r["route"] == "/predict" and r["load"] == "64 conns"]
        if len(runs) > 1:
            mean = float(np.mean(runs))
            print(
                f"\n{server}: /predict over {len(runs)} runs {min(runs):,.0f}-{max(runs):,.0f} req/s, "
                f"spread ±{100 * (max(runs) - min(runs)) / 2 / mean:.1f} % of the mean"
            )
    compare_with_reference(rows)
    mlflow_rows = [r for r in rows if r["server"] == "mlflow models serve"]
    if mlflow_rows:
        best = max(r["rps"] for r in rows if r["route"] == "/predict" and r["load"] == "64 conns")
        print(f"\nbest /predict vs mlflow models serve: {best / mlflow_rows[0]['rps']:.0f}x")
    out = REPO / "bench-results" / f"serving-{time.strftime('%Y%m%dT%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    print(f"\nrows written to {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
