"""Shared fixtures: the committed MNIST sample, free ports, and one real training run reused by many tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
SAMPLE_NPZ = FIXTURES / "mnist-sample.npz"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def sample_npz() -> Path:
    return SAMPLE_NPZ


@pytest.fixture(scope="session")
def sample() -> dict[str, np.ndarray]:
    with np.load(SAMPLE_NPZ) as npz:
        return {key: npz[key] for key in npz.files}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process: this repo importable, this venv's commands on PATH."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PATH": path, **(extra or {})}


def run_pipeline(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m pipeline ...`` as a user would, in its own process."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd, env=subprocess_env(env),
        capture_output=True, text=True, timeout=timeout,
    )


def last_json_line(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@dataclass
class TrainedRegistry:
    """A tracking store holding one trained, registered and promoted seed model (version 1)."""

    workdir: Path
    tracking_uri: str
    env: dict[str, str]
    result: dict
    stdout: str

    @property
    def export_path(self) -> Path:
        return Path(self.result["export_path"])


@dataclass
class RunningService:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_service(env: dict[str, str], log_path: Path, cwd: Path = REPO_ROOT, timeout: float = 180) -> RunningService:
    """``bentoml serve service:Digits`` on a free loopback port; returns once /readyz says 200."""
    port = free_port()
    log = log_path.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "bentoml", "serve", "service:Digits", "--host", "127.0.0.1", "--port", str(port),
         "--working-dir", str(REPO_ROOT)],
        cwd=cwd, env=subprocess_env(env),
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    service = RunningService(f"http://127.0.0.1:{port}", process, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return service  # exited: the caller looks at the return code and the log
        try:
            if requests.get(f"{service.url}/readyz", timeout=2).status_code == 200:
                return service
        except requests.RequestException:
            pass
        time.sleep(0.5)
    stop_service(service)
    raise AssertionError(f"service did not become ready in {timeout}s:\n{service.log()[-3000:]}")


def stop_service(service: RunningService) -> None:
    if service.process.poll() is None:
        os.killpg(service.process.pid, signal.SIGTERM)
        try:
            service.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(service.process.pid, signal.SIGKILL)
            service.process.wait(timeout=10)


@pytest.fixture(scope="session")
def trained_registry(tmp_path_factory: pytest.TempPathFactory) -> TrainedRegistry:
    """Train the seed config for 1 epoch on the sample into a temporary SQLite MLflow store."""
    workdir = tmp_path_factory.mktemp("registry")
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": tracking_uri}
    proc = run_pipeline(
        ["train", "--config", "seed", "--data", str(SAMPLE_NPZ), "--set", "epochs=1",
         "--set", "registry.accuracy_floor=0.3", "--set", f"export.base_dir={workdir / 'exports'}"],
        env, workdir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return TrainedRegistry(workdir, tracking_uri, env, last_json_line(proc.stdout), proc.stdout)
