"""MLflow registry webhooks: signatures made by MLflow's own sender code checked in-process, then a real
``mlflow server`` delivering a real webhook when the alias moves, answered by a two-worker service."""

from __future__ import annotations

import time
import uuid

import orjson
import pytest
import requests
from mlflow.webhooks.delivery import _generate_hmac_signature

from harness.launcher import start_mlflow_server, start_service, stop_service
from service.errors import InputError
from service.webhooks import RegistryEvent, Replayed, SiblingReloads, Unauthenticated, WebhookVerifier
from tests.helpers import client_for, wait_until

SECRET = "webhook-test-secret"
EVENT = {"entity": "model_version_alias", "action": "created", "data": {"name": "mnist-cnn", "alias": "champion", "version": "2"}}


def signed(body: bytes, secret: str = SECRET, timestamp: float | None = None, delivery_id: str | None = None) -> dict:
    """Headers as MLflow's webhook delivery sends them (its own signing function)."""
    delivery_id = delivery_id or str(uuid.uuid4())
    stamp = str(int(time.time() if timestamp is None else timestamp))
    return {
        "x-mlflow-delivery-id": delivery_id,
        "x-mlflow-timestamp": stamp,
        "x-mlflow-signature": _generate_hmac_signature(secret, delivery_id, stamp, body.decode()),
    }


def test_a_signed_event_is_read_and_names_the_alias_it_moves():
    body = orjson.dumps(EVENT)
    event = WebhookVerifier(SECRET).verify(body, signed(body))
    assert event == RegistryEvent("model_version_alias", "created", EVENT["data"])
    assert event.moves("mnist-cnn", "champion") and not event.moves("mnist-cnn", "challenger")


@pytest.mark.parametrize(
    ("headers_for", "error", "message"),
    [
        (lambda body: {}, Unauthenticated, "unsigned"),
        (lambda body: signed(body, secret="another-secret"), Unauthenticated, "does not match"),
        (lambda body: signed(body + b" "), Unauthenticated, "does not match"),  # body changed after signing
        (lambda body: signed(body, timestamp=time.time() - 3600), InputError, "from this server's clock"),
    ],
)
def test_unsigned_forged_and_stale_deliveries_are_refused(headers_for, error, message):
    body = orjson.dumps(EVENT)
    with pytest.raises(error, match=message):
        WebhookVerifier(SECRET).verify(body, headers_for(body))


def test_a_replayed_delivery_is_refused():
    verifier, body = WebhookVerifier(SECRET), orjson.dumps(EVENT)
    headers = signed(body)
    verifier.verify(body, headers)
    with pytest.raises(Replayed, match="already received"):
        verifier.verify(body, headers)
    verifier.verify(body, signed(body))  # a new delivery of the same event is fine


def test_a_signed_body_that_is_not_an_event_is_an_input_error():
    with pytest.raises(InputError, match="not an MLflow webhook payload"):
        WebhookVerifier(SECRET).verify(b"[1, 2]", signed(b"[1, 2]"))


def test_sibling_reloads_reach_other_watchers_not_the_notifier(tmp_path):
    calls: list[str] = []
    siblings = SiblingReloads(tmp_path / "reload", interval_s=0.02)
    siblings.watch(lambda: calls.append("reload"))
    time.sleep(0.1)
    siblings.notify()  # written by this process: its own watcher leaves it (it reloads itself)
    time.sleep(0.2)
    assert calls == []
    (tmp_path / "reload").write_text("999999 0")  # another worker's notification
    wait_until(lambda: calls, timeout=2, interval=0.02)
    siblings.stop()
    assert calls == ["reload"]


@pytest.mark.slow
def test_a_real_registry_webhook_moves_every_worker_to_the_new_champion_without_polling(trained_registry, tmp_path):
    registry = trained_registry.copy(tmp_path / "store")
    server_env = {"MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true"}
    tracking = start_mlflow_server(registry.tracking_uri, tmp_path / "mlflow.log", env=server_env)
    service = None
    try:
        client = client_for(tracking.url)
        (first,) = client.search_model_versions("name='mnist-cnn'")
        second = client.create_model_version(
            "mnist-cnn", first.source, run_id=first.run_id, model_id=first.source.removeprefix("models:/")
        )
        env = {
            "MLFLOW_TRACKING_URI": tracking.url,
            "MODEL_URI": "models:/mnist-cnn@champion",
            "MODEL_POLL_SECONDS": "0",  # no polling: only the webhook can move it
            "WEBHOOK_SECRET": SECRET,
            "SERVICE_WORKERS": "2",
        }
        service = start_service(env, tmp_path / "service.log")
        assert service.process.poll() is None, service.log()[-3000:]

        def versions_seen(connections: int = 16) -> set[str]:
            return {requests.get(f"{service.url}/model", timeout=10).json()["version"] for _ in range(connections)}

        assert versions_seen() == {first.version}
        client.create_webhook(
            name="digits", url=f"{service.url}/admin/registry-events", events=["model_version_alias.created"], secret=SECRET
        )
        moved = time.monotonic()
        client.set_registered_model_alias("mnist-cnn", "champion", second.version)
        while versions_seen() != {second.version} and time.monotonic() - moved < 10:
            time.sleep(0.1)
        took = time.monotonic() - moved
        assert versions_seen(32) == {second.version}, service.log()[-3000:]
        assert took < 5, f"every worker served the new champion only after {took:.1f} s"
        forged = requests.post(
            f"{service.url}/admin/registry-events",
            data=orjson.dumps(EVENT),
            headers={"Content-Type": "application/json"},
            timeout=10,
        )
        assert forged.status_code == 401 and "unsigned" in forged.json()["error"]
    finally:
        if service is not None:
            stop_service(service)
        stop_service(tracking)
