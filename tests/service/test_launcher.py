"""The launcher the tests and benchmarks use stops what it started, BentoML's workers included."""

from __future__ import annotations

import os
import signal
import socket
import time

import psutil
import pytest

from service.launcher import start_service, stop_process

pytestmark = pytest.mark.slow


def test_stopping_a_server_whose_group_was_killed_also_stops_its_worker(trained_registry, tmp_path):
    """BentoML runs its worker in a session of its own: a kill of the server's process group leaves it
    serving on both ports; stop_process ends it too, and the ports are free again."""
    service = start_service({**trained_registry.env, "MODEL_POLL_SECONDS": "0"}, tmp_path / "service.log")
    port = int(service.url.rsplit(":", 1)[1])
    descendants = psutil.Process(service.process.pid).children(recursive=True)
    os.killpg(service.process.pid, signal.SIGKILL)
    service.process.wait(timeout=30)
    survivors = [p for p in descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    stop_process(service, timeout=10)
    assert all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in descendants), survivors
    deadline = time.monotonic() + 10
    while True:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a restarted server binds
            try:
                probe.bind(("127.0.0.1", port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
