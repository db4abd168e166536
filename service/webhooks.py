"""MLflow registry webhooks: a new champion is served as soon as the registry moves the alias, not at the next poll.

MLflow 3 (``MlflowClient.create_webhook``) posts ``model_version_alias.created`` / ``.deleted`` events,
signed with a shared secret: ``X-MLflow-Signature: v1,<base64 HMAC-SHA256 of "<delivery id>.<timestamp>.<body>">``,
with ``X-MLflow-Delivery-Id`` and ``X-MLflow-Timestamp`` (Standard Webhooks' scheme). :class:`WebhookVerifier`
checks the signature in constant time, refuses timestamps more than ``tolerance_s`` away and delivery ids
it has already seen (replays), and returns the event. :class:`SiblingReloads` tells the replica's other
workers, which did not receive the request, to reload too (a file they watch). Polling
(``MODEL_POLL_SECONDS``) stays as the fallback for events that never arrive. Knows nothing of HTTP.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from service.errors import InputError, ServiceError

logger = logging.getLogger("digits.webhooks")
SIGNATURE_HEADER = "x-mlflow-signature"
DELIVERY_ID_HEADER = "x-mlflow-delivery-id"
TIMESTAMP_HEADER = "x-mlflow-timestamp"
ALIAS_ENTITY = "model_version_alias"


class Unauthenticated(ServiceError):
    http_status = 401


class Replayed(ServiceError):
    http_status = 409


@dataclass(frozen=True)
class RegistryEvent:
    entity: str
    action: str
    data: dict[str, Any]

    def moves(self, name: str, alias: str) -> bool:
        """Whether this event creates or deletes ``alias`` on registered model ``name``."""
        return self.entity == ALIAS_ENTITY and self.data.get("name") == name and self.data.get("alias") == alias


class WebhookVerifier:
    def __init__(self, secret: str, tolerance_s: float = 300.0, clock: Callable[[], float] = time.time) -> None:
        self._secret = secret.encode()
        self.tolerance_s = tolerance_s
        self._clock = clock
        self._seen: dict[str, float] = {}  # delivery id -> when it arrived; kept for twice the tolerance
        self._lock = threading.Lock()

    def verify(self, body: bytes, headers: dict[str, str]) -> RegistryEvent:
        """The event in ``body``, or :class:`Unauthenticated` (no or wrong signature), :class:`InputError`
        (stale timestamp, malformed body) or :class:`Replayed` (a delivery id seen before)."""
        delivery_id, timestamp = headers.get(DELIVERY_ID_HEADER), headers.get(TIMESTAMP_HEADER)
        signatures = headers.get(SIGNATURE_HEADER)
        if not (delivery_id and timestamp and signatures):
            required = f"{SIGNATURE_HEADER}, {DELIVERY_ID_HEADER} and {TIMESTAMP_HEADER}"
            raise Unauthenticated(f"unsigned request: {required} are required")
        signed = f"{delivery_id}.{timestamp}.".encode() + body
        expected = "v1," + base64.b64encode(hmac.new(self._secret, signed, hashlib.sha256).digest()).decode()
        if not any(hmac.compare_digest(expected, candidate) for candidate in signatures.split()):
            raise Unauthenticated("signature does not match (is WEBHOOK_SECRET the webhook's secret?)")
        now = self._clock()
        if not timestamp.isdigit() or abs(now - int(timestamp)) > self.tolerance_s:
            raise InputError(f"timestamp {timestamp} is more than {self.tolerance_s:.0f} s from this server's clock")
        with self._lock:
            self._seen = {seen: at for seen, at in self._seen.items() if now - at <= 2 * self.tolerance_s}
            if delivery_id in self._seen:
                raise Replayed(f"delivery {delivery_id} was already received")
            self._seen[delivery_id] = now
        try:
            payload = orjson.loads(body)
            return RegistryEvent(str(payload["entity"]), str(payload["action"]), dict(payload.get("data") or {}))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise InputError("the body is not an MLflow webhook payload (entity, action, data)") from None


class SiblingReloads:
    """Tells the other workers of this replica to reload: the worker that received a webhook touches a
    file their watcher threads check every ``interval_s`` (a stat call: nothing measurable)."""

    def __init__(self, path: Path | None = None, interval_s: float = 0.25) -> None:
        self.path = path or Path(tempfile.gettempdir()) / f"digits-reload-{os.getppid()}"
        self.interval_s = interval_s
        self._stop = threading.Event()

    def notify(self) -> None:
        self.path.write_text(f"{os.getpid()} {time.time()}")

    def watch(self, reload: Callable[[], object]) -> None:
        """Call ``reload`` (in a daemon thread) whenever another worker notifies."""
        own_pid = str(os.getpid())

        def run() -> None:
            last = self._stamp()
            while not self._stop.wait(self.interval_s):
                stamp = self._stamp()
                if stamp == last:
                    continue
                last = stamp
                try:
                    if self.path.read_text().split()[0] != own_pid:
                        reload()
                except Exception as exc:  # keep serving; polling is the fallback
                    logger.warning("reload after a registry event failed, still serving the loaded model: %s", exc)

        threading.Thread(target=run, name="sibling-reloads", daemon=True).start()

    def _stamp(self) -> float | None:
        try:
            return self.path.stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def stop(self) -> None:
        self._stop.set()
