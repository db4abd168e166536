"""CI runs the `smoke` load profile against the real service: a correctness and zero-failure check."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.launcher import REPO_ROOT, RunningService, child_env, start_service, stop_service

pytestmark = pytest.mark.slow


def run_smoke(service: RunningService, out: Path, *python_args: str) -> subprocess.CompletedProcess:
    """``python -m loadtests.run smoke`` against ``service`` (``python_args`` replace ``-m loadtests.run``)."""
    command = [sys.executable, *(python_args or ("-m", "loadtests.run")), "smoke", "--host", service.url]
    command += ["--grpc-target", service.grpc_target, "--out", str(out)]
    env = child_env({"LOAD_MIN_CORRECT": "0"})
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def service(trained_registry, tmp_path_factory):
    """One service for both profiles: neither changes it."""
    running = start_service({**trained_registry.env, "MODEL_POLL_SECONDS": "0"}, tmp_path_factory.mktemp("smoke") / "service.log")
    assert running.process.poll() is None, running.log()[-3000:]
    yield running
    stop_service(running)


def test_smoke_profile_passes_against_the_real_service(service, tmp_path):
    run = run_smoke(service, tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (report,) = [p for p in tmp_path.iterdir() if p.name.endswith("-smoke")]
    summary = json.loads((report / "summary.json").read_text())
    assert summary["passed"] and summary["stats"]["failures"] == 0 and summary["stats"]["requests"] > 20
    assert (report / "chart.png").stat().st_size > 0 and (report / "report.html").exists()
    assert (report / "locust_stats.csv").exists()
    assert "gRPC" in (report / "locust_stats.csv").read_text()  # the gRPC user's calls are in the same report


def test_a_broken_slo_fails_the_run_and_says_which(service, tmp_path):
    unmeetable = (
        "import sys, loadtests.run as r; p = r.load_profiles(); p['smoke']['slo']['min_rps'] = 10**9; "
        "r.load_profiles = lambda: p; sys.exit(r.main(sys.argv[1:]))"
    )
    run = run_smoke(service, tmp_path / "profiles", "-c", unmeetable)
    assert run.returncode == 1
    assert "SLO BROKEN: throughput" in run.stderr
