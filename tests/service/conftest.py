"""One real service for the service tests: ``bentoml serve`` on free loopback ports (HTTP and gRPC)."""

from __future__ import annotations

import pytest

from harness.launcher import start_service, stop_service
from tests.service.helpers import ADMIN_TOKEN


@pytest.fixture(scope="session")
def service(trained_registry, tmp_path_factory):
    env = {
        **trained_registry.env,
        "MODEL_POLL_SECONDS": "1",
        "ADMIN_TOKEN": ADMIN_TOKEN,
        "MAX_IMAGES_PER_REQUEST": "300",
        "MAX_BODY_BYTES": str(4 * 1024 * 1024),
    }
    running = start_service(env, tmp_path_factory.mktemp("service") / "service.log")
    assert running.process.poll() is None, running.log()[-3000:]
    yield running
    stop_service(running)
