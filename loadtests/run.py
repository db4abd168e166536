"""Run a named load profile headless and judge it against its SLOs.

    python -m loadtests.run smoke --host http://127.0.0.1:3000
    python -m loadtests.run steady --model-uri exports/mnist      # starts the service itself

Writes ``loadtests/reports/<UTC time>-<profile>/``: Locust's CSVs and HTML report, ``chart.png``
(requests/s and p50/p95/p99 over time) and ``summary.json``. Exits 1 and names the broken SLO when
one breaks. Locust runs in its own process (it monkey-patches with gevent); this runner only reads
its CSVs, and reports how much CPU the load generator itself used, since it shares the machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
from contract import registry_uri  # noqa: E402
from harness.launcher import start_service, stop_service  # noqa: E402

PROFILES = HERE / "profiles.yaml"


def load_profiles() -> dict:
    return yaml.safe_load(PROFILES.read_text())


def locust_command(profile: dict, host: str, out: Path, processes: int) -> list[str]:
    files = str(HERE / "locustfile.py")
    if profile.get("shape"):
        files += f",{REPO / profile['shape']}"
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        files,
        "--headless",
        "--host",
        host,
        "--csv",
        str(out / "locust"),
        "--csv-full-history",
        "--html",
        str(out / "report.html"),
        "--only-summary",
        "--exit-code-on-error",
        "0",
    ]
    if not profile.get("shape"):
        command += [
            "--users",
            str(profile["users"]),
            "--spawn-rate",
            str(profile["spawn_rate"]),
            "--run-time",
            profile["run_time"],
        ]
    if processes > 1:
        command += ["--processes", str(processes)]
    return command + list(profile["user_classes"])


def aggregated(out: Path) -> dict:
    with (out / "locust_stats.csv").open() as handle:
        row = next(r for r in csv.DictReader(handle) if r["Name"] == "Aggregated")
    requests_total = int(row["Request Count"])
    return {
        "requests": requests_total,
        "failures": int(row["Failure Count"]),
        "failure_ratio": int(row["Failure Count"]) / requests_total if requests_total else 1.0,
        "requests_per_s": float(row["Requests/s"]),
        "p50_ms": _ms(row["50%"]),
        "p95_ms": _ms(row["95%"]),
        "p99_ms": _ms(row["99%"]),
        "avg_ms": _ms(row["Average Response Time"]),
    }


def _ms(value: str) -> float:
    """A latency cell of Locust's CSV; 'N/A' (no request finished) reads as 0."""
    return float(value) if value not in ("", "N/A") else 0.0


def judge(stats: dict, slo: dict) -> list[str]:
    broken = []
    if slo.get("max_failure_ratio") is not None and stats["failure_ratio"] > slo["max_failure_ratio"]:
        broken.append(f"failure ratio {stats['failure_ratio']:.4f} > {slo['max_failure_ratio']}")
    for key in ("p50_ms", "p99_ms"):
        if slo.get(key) is not None and stats[key] > slo[key]:
            broken.append(f"{key[:-3]} latency {stats[key]:.0f} ms > {slo[key]} ms")
    if slo.get("min_rps") is not None and stats["requests_per_s"] < slo["min_rps"]:
        broken.append(f"throughput {stats['requests_per_s']:.1f} requests/s < {slo['min_rps']}")
    return broken


def chart(out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    with (out / "locust_stats_history.csv").open() as handle:
        rows = [r for r in csv.DictReader(handle) if r["Name"] == "Aggregated"]
    start = int(rows[0]["Timestamp"]) if rows else 0
    seconds = [int(r["Timestamp"]) - start for r in rows]

    def series(key: str) -> list[float]:
        return [float(r[key]) if r[key] not in ("", "N/A") else float("nan") for r in rows]

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot(seconds, series("Requests/s"), label="requests/s")
    top.plot(seconds, series("Failures/s"), label="failures/s", color="tab:red")
    top.set_ylabel("per second")
    top.legend()
    top.grid(alpha=0.3)
    for key in ("50%", "95%", "99%"):
        bottom.plot(seconds, series(key), label=f"p{key[:-1]}")
    bottom.set_ylabel("latency (ms)")
    bottom.set_xlabel("seconds")
    bottom.legend()
    bottom.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path = out / "chart.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@dataclass
class Outcome:
    """A judged load test: the summary written to ``summary.json``, and the SLOs it broke."""

    summary: dict
    broken: list[str]

    @property
    def stats(self) -> dict:
        return self.summary["stats"]


def run_profile(
    name: str,
    host: str,
    out_dir: Path,
    *,
    profile: dict | None = None,
    user_classes: list[str] | None = None,
    run_time: str | None = None,
    grpc_target: str | None = None,
    processes: int | None = None,
) -> Outcome:
    """Run profile ``name`` (or ``profile`` as given) against ``host``, headless, and judge it.

    Writes Locust's CSVs and HTML report, ``chart.png`` and ``summary.json`` under
    ``<out_dir>/<UTC time>-<name>/``. Raises RuntimeError when Locust itself fails."""
    profile = dict(profile or load_profiles()[name])
    if user_classes:
        profile["user_classes"] = user_classes
    if run_time:
        profile["run_time"] = run_time
    out = out_dir / f"{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}-{name}"
    out.mkdir(parents=True)
    env = {**os.environ, **{k: str(v) for k, v in (profile.get("env") or {}).items()}}
    if grpc_target:
        env["LOAD_GRPC_TARGET"] = grpc_target
    command = locust_command(profile, host, out, processes or profile.get("processes", 1))
    print(f"profile {name}: {profile['description']}\n$ {' '.join(command)}", flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(command, env=env, cwd=REPO)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode not in (0, 1) or not (out / "locust_stats.csv").exists():
        raise RuntimeError(f"locust exited with {proc.returncode} (see {out})")

    stats = aggregated(out)
    generator_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    stats["load_generator_cpu_cores"] = round(generator_cpu / wall, 2)
    broken = judge(stats, profile.get("slo") or {})
    chart(out, f"{name}: {stats['requests_per_s']:.0f} req/s, p50 {stats['p50_ms']:.0f} ms, p99 {stats['p99_ms']:.0f} ms")
    summary = {
        "profile": name,
        "host": host,
        "stats": stats,
        "slo": profile.get("slo"),
        "slo_broken": broken,
        "passed": not broken,
        "machine_cpus": os.cpu_count(),
        "report_dir": str(out),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return Outcome(summary, broken)


def main(argv: list[str] | None = None) -> int:
    profiles = load_profiles()
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("profile", choices=sorted(profiles))
    parser.add_argument("--host", help="base URL of a running service; without it the service is started here")
    parser.add_argument(
        "--model-uri",
        default=os.environ.get("MODEL_URI") or registry_uri(),
        help=f"MODEL_URI for the service this runner starts [{registry_uri()}]",
    )
    parser.add_argument(
        "--grpc-target",
        help="host:port of the running service's gRPC API, for GrpcUser [the host's name, port $GRPC_PORT or 8500]",
    )
    parser.add_argument("--processes", type=int, help="Locust processes (default: the profile's)")
    parser.add_argument("--user-class", action="append", help="override the profile's Locust user classes")
    parser.add_argument("--out", type=Path, default=HERE / "reports")
    args = parser.parse_args(argv)

    service = None
    if args.host is None:
        service = start_service(
            {"MODEL_URI": args.model_uri, "MODEL_POLL_SECONDS": "0"}, args.out / f"service-{os.getpid()}.log", cwd=Path.cwd()
        )
        if service.process.poll() is not None:
            print(f"error: the service did not start (see {service.log_path})", file=sys.stderr)
            return 2
    try:
        outcome = run_profile(
            args.profile,
            args.host or service.url,
            args.out,
            profile=profiles[args.profile],
            user_classes=args.user_class,
            processes=args.processes,
            grpc_target=args.grpc_target or (service.grpc_target if service is not None else None),
        )
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if service is not None:
            stop_service(service)
    print(json.dumps(outcome.summary, indent=2))
    for line in outcome.broken:
        print(f"SLO BROKEN: {line}", file=sys.stderr)
    return 1 if outcome.broken else 0


if __name__ == "__main__":
    sys.exit(main())
