"""Several workers in one replica: each has its own listening socket, so connections spread over all of
them (BentoML's shared socket gave one worker 64 of 64 connections in a burst)."""

from __future__ import annotations

import http.client
import json

import psutil
import pytest

from harness.launcher import start_service, stop_service

pytestmark = pytest.mark.slow


def _burst(host: str, port: int, image: list, workers: list[psutil.Process]) -> dict[int, int]:
    """64 keep-alive connections, one prediction on each; how many each worker holds."""
    connections = [http.client.HTTPConnection(host, port, timeout=30) for _ in range(64)]
    try:
        for connection in connections:
            connection.connect()
        for connection in connections:
            connection.request("POST", "/predict", json.dumps(image), {"Content-Type": "application/json"})
            answer = connection.getresponse()
            assert answer.status == 200 and json.loads(answer.read())[0]["digit"] in range(10)
        return {
            worker.pid: sum(1 for c in worker.net_connections("tcp") if c.status == "ESTABLISHED" and c.laddr.port == port)
            for worker in workers
        }
    finally:
        for connection in connections:
            connection.close()


def test_two_workers_share_bursts_of_connections_and_both_answer(trained_registry, sample, tmp_path):
    service = start_service({**trained_registry.env, "MODEL_POLL_SECONDS": "0", "SERVICE_WORKERS": "2"}, tmp_path / "s.log")
    try:
        host, port = service.url.removeprefix("http://").rsplit(":", 1)
        workers = psutil.Process(service.process.pid).children(recursive=True)
        for _ in range(3):  # BentoML's shared socket: 64:0 in some bursts, 31:33 in others
            held = _burst(host, int(port), sample["x_test"][0].tolist(), workers)
            counts = sorted(count for count in held.values() if count)
            assert len(counts) == 2 and sum(counts) == 64, held
            assert counts[0] >= 16, held  # kernel hashing: fewer than 16 of 64 on one of two has probability ~5e-5
    finally:
        stop_service(service)
