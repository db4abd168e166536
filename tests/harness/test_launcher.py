"""The launcher the tests and benchmarks use stops what it started, BentoML's workers included."""

from __future__ import annotations

import socket
import time

import psutil
import pytest

from harness.launcher import start_service, stop_process

pytestmark = pytest.mark.slow


def test_a_server_that_ignores_sigterm_long_enough_is_killed_with_its_worker(trained_registry, tmp_path):
    """BentoML runs its worker in a session of its own, so the group SIGKILL that follows a SIGTERM
    nobody acted on in time used to leave the worker serving on both ports; stop_process ends it too,
    and the port is free again."""
    service = start_service({**trained_registry.env, "MODEL_POLL_SECONDS": "0"}, tmp_path / "service.log")
    port = int(service.url.rsplit(":", 1)[1])
    descendants = psutil.Process(service.process.pid).children(recursive=True)
    assert descendants, "bentoml serve has a worker process"
    stop_process(service, timeout=0.05)  # no time for a graceful stop: straight to the kill
    gone, alive = psutil.wait_procs(descendants, timeout=3)  # stop_process has returned: nothing may linger
    assert not alive, [p.cmdline()[:4] for p in alive]
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
