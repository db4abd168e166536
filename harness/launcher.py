"""Start servers as child processes on free loopback ports, wait until they are healthy, stop them:
this service (``bentoml serve service:Digits``), MLflow's scoring server and MLflow's tracking server,
and nginx in front of several replicas of the service (the compose stack's load balancer).

Used by the tests, the load-test runner and the benchmark scripts, so all of them run the real servers
the same way an operator does.
"""

from __future__ import annotations

import os
import re
import shutil
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
NGINX_TEMPLATE = REPO_ROOT / "deploy" / "nginx" / "templates" / "digits.conf.template"


@dataclass
class RunningProcess:
    """A server started by :func:`start_process`: its base URL, process and log."""

    url: str
    process: subprocess.Popen
    log_path: Path
    grpc_target: str | None = None  # host:port of the service's gRPC API, None when GRPC_PORT=0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


RunningService = RunningProcess


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process: this repo importable, this interpreter's commands on PATH."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PATH": path, **(extra or {})}


def start_process(
    command: list[str],
    url: str,
    ready_path: str,
    log_path: Path,
    env: dict[str, str] | None = None,
    cwd: Path = REPO_ROOT,
    timeout: float = 180,
    grpc_target: str | None = None,
) -> RunningProcess:
    """Start a server in its own session and return once ``url + ready_path`` answers 200, or once the
    process has exited (the caller looks at ``process.returncode`` and the log); stop it after ``timeout``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, cwd=cwd, env=child_env(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    running = RunningProcess(url, process, log_path, grpc_target)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return running
        try:
            with urllib.request.urlopen(f"{url}{ready_path}", timeout=2) as answer:
                if answer.status == 200:
                    return running
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    stop_process(running)
    raise TimeoutError(f"{' '.join(command[:5])} did not become ready in {timeout}s:\n{running.log()[-3000:]}")


def stop_process(running: RunningProcess, timeout: float = 30) -> None:
    """SIGTERM to the process group, SIGKILL after ``timeout`` seconds; then SIGKILL to any of its
    descendants still running.

    The descendants are listed before the first signal, by parentage rather than by group: BentoML
    starts its workers in sessions of their own, so a group kill alone would leave a worker serving,
    holding its ports, once the parent is gone."""
    import psutil

    try:
        descendants = psutil.Process(running.process.pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    if running.process.poll() is None:
        os.killpg(running.process.pid, signal.SIGTERM)
        try:
            running.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(running.process.pid, signal.SIGKILL)
            running.process.wait(timeout=10)
    _, alive = psutil.wait_procs(descendants, timeout=timeout)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)


stop_service = stop_process


def start_service(
    env: dict[str, str], log_path: Path, cwd: Path = REPO_ROOT, timeout: float = 180, port: int | None = None
) -> RunningProcess:
    """``bentoml serve service:Digits`` on a free loopback port, ready when ``/readyz`` answers.

    gRPC gets a free loopback port unless ``env`` sets ``GRPC_PORT``. Each service gets its own
    ``BENTOML_HOME``: BentoML keeps its Prometheus files there and wipes them when a server starts, so
    two servers sharing one would lose each other's metrics. ``port`` restarts a replica where it was."""
    port = port or free_port()
    env = {
        "GRPC_HOST": "127.0.0.1",
        "GRPC_PORT": str(free_port()),
        "BENTOML_HOME": str(log_path.parent / f"bentoml-home-{port}"),
        "SERVICE_WORKERS": "1",  # tests and benchmarks say when they want more (the service's default: one per core)
        **env,
    }
    grpc_port = int(env["GRPC_PORT"])
    command = [sys.executable, "-m", "bentoml", "serve", "service:Digits", "--working-dir", str(REPO_ROOT)]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    grpc_target = f"127.0.0.1:{grpc_port}" if grpc_port else None
    started = time.monotonic()
    running = start_process(command, f"http://127.0.0.1:{port}", "/readyz", log_path, env, cwd, timeout, grpc_target)
    workers = int(env["SERVICE_WORKERS"]) if env["SERVICE_WORKERS"].strip().isdigit() else 0
    if workers > 1 and running.process.poll() is None:
        _wait_for_listeners(running, port, workers, timeout - (time.monotonic() - started))
    return running


def _wait_for_listeners(running: RunningProcess, port: int, workers: int, timeout: float) -> None:
    """Wait until ``workers`` of the server's processes listen on ``port``: ``/readyz`` answers once
    one worker serves, and each worker listens only once it has started (its model loaded)."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and running.process.poll() is None:
        listening = set()
        for child in psutil.Process(running.process.pid).children(recursive=True):
            try:
                if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in child.net_connections("tcp")):
                    listening.add(child.pid)
            except psutil.Error:
                pass
        if len(listening) >= workers:
            return
        time.sleep(0.2)
    if running.process.poll() is None:
        stop_process(running)
        raise TimeoutError(f"not every one of {workers} workers listened within the timeout:\n{running.log()[-3000:]}")


def start_mlflow_models_serve(
    model_uri: str, log_path: Path, env: dict[str, str] | None = None, cwd: Path = REPO_ROOT, timeout: float = 180
) -> RunningProcess:
    """MLflow's own scoring server (``mlflow models serve``) for ``model_uri``, ready when ``/ping`` answers."""
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
    return _on_loopback(command, "/ping", log_path, env, cwd, timeout)


def start_mlflow_server(
    backend_store_uri: str, log_path: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> RunningProcess:
    """An MLflow tracking server on a free loopback port, ready when ``/health`` answers."""
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri, "--workers", "1"]
    return _on_loopback(command, "/health", log_path, env, REPO_ROOT, timeout)


def _on_loopback(
    command: list[str], ready_path: str, log_path: Path, env: dict[str, str] | None, cwd: Path, timeout: float
) -> RunningProcess:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    return start_process([*command, "--host", "127.0.0.1", "--port", str(port)], url, ready_path, log_path, env, cwd, timeout)


def render_nginx_config(http_upstreams: list[str], grpc_upstreams: list[str], http_port: int, grpc_port: int) -> str:
    """The compose stack's nginx site (``deploy/nginx/templates``) for replicas at ``host:port``
    addresses, filled in as nginx's image does with envsubst."""
    values = {
        "LB_HTTP_PORT": f"127.0.0.1:{http_port}",
        "LB_GRPC_PORT": f"127.0.0.1:{grpc_port}",
        "HTTP_UPSTREAMS": "\n    ".join(f"server {address} max_fails=1 fail_timeout=2s;" for address in http_upstreams),
        "GRPC_UPSTREAMS": "\n    ".join(f"server {address} max_fails=1 fail_timeout=2s;" for address in grpc_upstreams),
        "RESOLVER": "127.0.0.1",  # unused: loopback addresses need no DNS
    }
    return re.sub(r"\$\{(\w+)\}", lambda match: values[match.group(1)], NGINX_TEMPLATE.read_text())


def nginx_binary() -> str | None:
    """The system's nginx (Debian installs it in /usr/sbin, often not on a user's PATH), or None."""
    debian = Path("/usr/sbin/nginx")
    return shutil.which("nginx") or (str(debian) if debian.exists() else None)


def start_nginx(http_upstreams: list[str], grpc_upstreams: list[str], workdir: Path, timeout: float = 30) -> RunningProcess:
    """nginx (the system's, e.g. Debian's package) in front of the given replicas on free loopback
    ports, in the foreground with everything under ``workdir``; ready when ``/lb/healthz`` answers."""
    binary = nginx_binary()
    if binary is None:
        raise FileNotFoundError("nginx is not installed (Debian: apt-get install nginx-light)")
    workdir.mkdir(parents=True, exist_ok=True)
    http_port, grpc_port = free_port(), free_port()
    (workdir / "digits.conf").write_text(render_nginx_config(http_upstreams, grpc_upstreams, http_port, grpc_port))
    temp_paths = "\n".join(
        f"    {kind}_temp_path {workdir / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # run as root (CI does), nginx's workers drop to nobody, who cannot write the request bodies it buffers
    # to files under a root-owned test directory: keep them the invoking user
    user = "user root;\n" if os.geteuid() == 0 else ""
    (workdir / "nginx.conf").write_text(
        f"""daemon off;
{user}worker_processes 1;
pid {workdir / "nginx.pid"};
error_log {workdir / "error.log"} warn;
events {{ worker_connections 4096; }}
http {{
{temp_paths}
    include {workdir / "digits.conf"};
}}
"""
    )
    command = [binary, "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-e", str(workdir / "error.log")]
    url = f"http://127.0.0.1:{http_port}"
    return start_process(command, url, "/lb/healthz", workdir / "nginx.log", None, workdir, timeout, f"127.0.0.1:{grpc_port}")
