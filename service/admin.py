"""The admin routes: ``POST /admin/reload`` (a bearer token, failed attempts limited per address) and
``POST /admin/registry-events`` (signed MLflow registry webhooks). Both are off until their secret is
set. :func:`add_routes` adds them to the HTTP app (:mod:`service.service` does)."""

from __future__ import annotations

import asyncio
import hmac
import time
from collections import defaultdict, deque

from fastapi import FastAPI, Request
from starlette.responses import Response

from service.errors import error_response
from service.http import body_of, core_of, json_response, settings_of
from service.rollout import Rollout
from service.runtime import ModelLoadError, RegistryUnavailable, parse_registry_uri
from service.webhooks import RegistryEvent


class FailedAttempts:
    """Failed admin logins per client address: past ``limit`` within ``window_s``, refuse for the window."""

    def __init__(self, limit: int = 5, window_s: float = 60.0) -> None:
        self.limit, self.window_s = limit, window_s
        self._times: dict[str, deque[float]] = defaultdict(deque)

    def retry_after(self, client: str) -> int:
        """Seconds until ``client`` may try again (0: now)."""
        times, now = self._times[client], time.monotonic()
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            self._times.pop(client, None)
        return int(times[0] + self.window_s - now) + 1 if len(times) >= self.limit else 0

    def failed(self, client: str) -> None:
        self._times[client].append(time.monotonic())


ADMIN_ATTEMPTS = FailedAttempts()


def reload(request: Request) -> Response:
    """Load the version MODEL_URI points at now (Authorization: Bearer $ADMIN_TOKEN).

    401 on a missing or wrong token; after 5 failures from one address in a minute, 429 for the rest
    of that minute. 503 when the registry cannot be reached (within REGISTRY_TIMEOUT_S), 409 when the
    new version cannot be loaded; the previous model keeps serving either way.
    """
    token = settings_of(request).admin_token
    if not token:
        return error_response(404, "admin endpoints are off (set ADMIN_TOKEN to enable them)")
    client = request.client.host if request.client else "unknown"
    wait = ADMIN_ATTEMPTS.retry_after(client)
    if wait:
        response = error_response(429, f"too many failed admin attempts from {client}; retry in {wait} s")
        response.headers["Retry-After"] = str(wait)
        return response
    scheme, _, supplied = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(supplied.strip().encode(), token.encode()):
        ADMIN_ATTEMPTS.failed(client)
        response = error_response(401, "missing or wrong token; send Authorization: Bearer <ADMIN_TOKEN>")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response
    try:
        old, new = core_of(request).runtime.reload()
    except RegistryUnavailable as exc:
        return error_response(503, f"reload failed, still serving the previous model: {exc}")
    except ModelLoadError as exc:
        return error_response(409, f"reload failed, still serving the previous model: {exc}")
    return json_response(
        {
            "previous_version": old.version if old else None,
            "version": new.version,
            "changed": old is None or old.version != new.version,
        }
    )


async def registry_event(request: Request) -> Response:
    """MLflow registry webhooks (``model_version_alias.created``/``.deleted``, signed with WEBHOOK_SECRET):
    when the alias this service follows moves, reload now in this worker and tell the others. 404 when
    WEBHOOK_SECRET is unset; 401 unsigned or wrongly signed, 400 stale or malformed, 409 a replayed delivery."""
    webhooks = getattr(request.app.state, "webhooks", None)
    if webhooks is None:
        return error_response(404, "registry webhooks are off (set WEBHOOK_SECRET to enable them)")
    verifier, siblings = webhooks
    body = await body_of(request)
    event = verifier.verify(body, {name.lower(): value for name, value in request.headers.items()})
    core = core_of(request)
    runtimes = [core.runtime] + ([core.challenger.runtime] if isinstance(core, Rollout) and core.challenger else [])
    moved = [runtime for runtime in runtimes if _follows(runtime.model_uri, event)]
    if not moved:
        followed = ", ".join(runtime.model_uri for runtime in runtimes)
        return json_response({"reloaded": False, "reason": f"not about {followed}", "event": f"{event.entity}.{event.action}"})
    siblings.notify()
    answers = []
    for runtime in moved:
        try:
            old, new = await asyncio.to_thread(runtime.reload)
            previous = old.version if old else None
            answers.append({"model_uri": runtime.model_uri, "previous_version": previous, "version": new.version})
        except (RegistryUnavailable, ModelLoadError) as exc:
            answers.append({"model_uri": runtime.model_uri, "error": f"still serving the previous model: {exc}"})
    return json_response({"reloaded": all("version" in answer for answer in answers), "models": answers})


def _follows(model_uri: str, event: RegistryEvent) -> bool:
    if not model_uri.startswith("models:/"):
        return False
    name, alias, _ = parse_registry_uri(model_uri)
    return alias is not None and event.moves(name, alias)


def add_routes(app: FastAPI) -> None:
    """``POST /admin/reload`` and ``POST /admin/registry-events`` on ``app`` (as routes of its own, not an
    included router: the edge's route table reads each route's path)."""
    app.add_api_route("/admin/reload", reload, methods=["POST"])
    app.add_api_route("/admin/registry-events", registry_event, methods=["POST"])
