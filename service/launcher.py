"""Start ``bentoml serve service:Digits`` as a child process on a free loopback port, and stop it.

Used by the tests, the load-test runner and the benchmark scripts, so all of them run the real server
the same way an operator does.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class RunningService:
    url: str
    process: subprocess.Popen
    log_path: Path
    grpc_target: str | None = None  # host:port of its gRPC API, None when GRPC_PORT=0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process: this repo importable, this interpreter's commands on PATH."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PATH": path, **(extra or {})}


def start_service(env: dict[str, str], log_path: Path, cwd: Path = REPO_ROOT, timeout: float = 180) -> RunningService:
    """Start the service and return once ``/readyz`` answers 200, or once the process has exited
    (the caller looks at ``process.returncode`` and the log). gRPC gets a free loopback port unless
    ``env`` sets ``GRPC_PORT``. Each service gets its own ``BENTOML_HOME``: BentoML keeps its Prometheus
    files there and wipes them when a server starts, so two servers sharing one would lose each other's
    metrics."""
    port = free_port()
    env = {"GRPC_HOST": "127.0.0.1", "GRPC_PORT": str(free_port()),
           "BENTOML_HOME": str(log_path.parent / f"bentoml-home-{port}"), **env}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "bentoml", "serve", "service:Digits", "--host", "127.0.0.1", "--port", str(port),
             "--working-dir", str(REPO_ROOT)],
            cwd=cwd, env=child_env(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    grpc_port = int(env["GRPC_PORT"])
    service = RunningService(f"http://127.0.0.1:{port}", process, log_path,
                             f"127.0.0.1:{grpc_port}" if grpc_port else None)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return service
        try:
            with urllib.request.urlopen(f"{service.url}/readyz", timeout=2) as answer:
                if answer.status == 200:
                    return service
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    stop_service(service)
    raise TimeoutError(f"service did not become ready in {timeout}s:\n{service.log()[-3000:]}")


def stop_service(service: RunningService) -> None:
    if service.process.poll() is None:
        os.killpg(service.process.pid, signal.SIGTERM)
        try:
            service.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(service.process.pid, signal.SIGKILL)
            service.process.wait(timeout=10)
