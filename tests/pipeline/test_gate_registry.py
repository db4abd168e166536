"""The gate against a real tracking server: a registry error while the gate reads the champion fails
the gate; it is never read as "no champion" (which would promote on the accuracy floor alone)."""

from __future__ import annotations

import http.server
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from harness.launcher import start_mlflow_server, stop_process
from pipeline import register
from pipeline.gate import gate_and_promote, lock_name

pytestmark = pytest.mark.slow
NAME = "mnist-cnn"


class FailingRegistryProxy(http.server.ThreadingHTTPServer):
    """Forwards every request to the tracking server, except that once the gate lock has been created it
    answers ``503`` to reads of the registered model ``mnist-cnn``: a registry outage inside the gate."""

    def __init__(self, upstream: str) -> None:
        self.upstream, self.lock_taken, self.failed_reads, self.armed = upstream, False, 0, True
        super().__init__(("127.0.0.1", 0), _Forward)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Forward(http.server.BaseHTTPRequestHandler):
    server: FailingRegistryProxy

    def log_message(self, *args: object) -> None:
        pass

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        url = urlsplit(self.path)
        if (
            self.server.armed
            and self.server.lock_taken
            and url.path.endswith("/registered-models/get")
            and parse_qs(url.query).get("name") == [NAME]
        ):
            self.server.failed_reads += 1
            return self._reply(503, b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "registry outage"}')
        request = urllib.request.Request(self.server.upstream + self.path, data=body or None, method=self.command)
        for key in ("Content-Type", "Authorization"):
            if self.headers.get(key):
                request.add_header(key, self.headers[key])
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                status, payload = answer.status, answer.read()
        except urllib.error.HTTPError as error:
            status, payload = error.code, error.read()
        if url.path.endswith("/registered-models/create") and status == 200 and lock_name(NAME).encode() in body:
            self.server.lock_taken = True
        self._reply(status, payload)

    def _reply(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PATCH = do_DELETE = _forward


@pytest.fixture
def proxied_registry(tmp_path, monkeypatch) -> Iterator[FailingRegistryProxy]:
    server = start_mlflow_server(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "mlflow.log")
    proxy = FailingRegistryProxy(server.url)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once: the outage is the point
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(proxy.url)  # an earlier test's process-wide URI would win over the variable
    try:
        client = MlflowClient(proxy.url)
        client.create_registered_model(NAME)
        for _ in range(2):
            client.create_model_version(NAME, source="s3://unused-bucket/model")  # never downloaded
        client.set_registered_model_alias(NAME, "champion", "1")
        yield proxy
    finally:
        mlflow.set_tracking_uri(previous)
        proxy.shutdown()
        stop_process(server)


def test_a_registry_error_while_reading_the_champion_fails_the_gate_and_moves_nothing(proxied_registry):
    with pytest.raises(MlflowException):
        gate_and_promote(NAME, "2", candidate_accuracy=0.99, floor=0.5, champion_accuracy=lambda version: 0.995)
    assert proxied_registry.failed_reads >= 1  # the outage did hit the gate's read of the champion
    proxied_registry.lock_taken = False  # the outage is over
    assert register.alias_version(NAME, "champion") == "1"
    assert register.current_champion(NAME).version == "1"
    with pytest.raises(MlflowException):  # the gate released its lock on the way out
        MlflowClient().get_registered_model(lock_name(NAME))


def test_no_model_or_no_alias_is_no_champion(proxied_registry):
    proxied_registry.armed = False  # no outage here
    assert register.current_champion("no-such-model") is None
    client = MlflowClient()
    client.delete_registered_model_alias(NAME, "champion")
    assert register.current_champion(NAME) is None
    outcome = gate_and_promote(NAME, "2", candidate_accuracy=0.99, floor=0.5, champion_accuracy=lambda version: 1.0)
    assert outcome.decision.promote and outcome.previous_champion is None
    assert register.alias_version(NAME, "champion") == "2"
