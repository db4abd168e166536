"""What every HTTP request meets first, before any route: the service's edge.

- Only known paths go further; anything else is a ``404 {"error": …}`` answered here. BentoML's
  request metrics are labelled by route template, with every unknown path as ``unmatched``
  (:func:`label_metrics_by_route`): 20,000 random paths used to add 400,000 lines to ``/metrics``.
- A request body must arrive within ``CLIENT_BODY_TIMEOUT_S`` (else 408) and under ``MAX_BODY_BYTES``
  (else 413), and it is read *before* the request takes one of ``SERVICE_MAX_CONCURRENCY`` slots:
  clients that connect and never send cannot lock out clients that do. The bodies a worker holds at
  once, read or being read, stay under ``MAX_BODY_BYTES_IN_FLIGHT`` (else 503 with Retry-After), so
  many clients each sending almost ``MAX_BODY_BYTES`` cannot take a replica past its memory limit.
- Request headers must arrive within ``CLIENT_HEADER_TIMEOUT_S`` (:class:`HeaderTimeoutProtocol`, an
  uvicorn protocol, since headers are read before any ASGI code runs), else 408 and the connection
  is closed.
- Every answer carries ``X-Content-Type-Options: nosniff``; the draw page a Content-Security-Policy
  that allows only its own origin.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service import open_inference, tfserving
from service.deadlines import Sweeper, TaskDeadlines, tick_for
from service.errors import error_body
from service.framework_patches import BENTOML_STATIC, ResponseDeadline
from service.hot_path import HOT_ROUTES, JSON_HEADER, HotRoutes, Response, send_response

PROBES = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})  # never queued behind predictions
BENTOML_ROUTES = {"/": {"GET"}, "/docs.json": {"GET"}, "/schema.json": {"GET"}, **{path: {"GET"} for path in PROBES}}
V2_PROBES = frozenset({"/v2/health/live", "/v2/health/ready"})  # the Open Inference Protocol's (KServe's probes)
METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
DRAW_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
NOSNIFF = (b"x-content-type-options", b"nosniff")


@dataclass(frozen=True)
class EdgeLimits:
    max_body_bytes: int
    body_timeout_s: float
    max_concurrency: int
    max_body_bytes_in_flight: int | None = None  # None: 4 x max_body_bytes


class RouteTable:
    """The paths this service answers, as (route template, allowed methods); built once."""

    def __init__(self, app_routes: list[Any]) -> None:
        self.exact: dict[str, set[str]] = {path: set(methods) for path, methods in BENTOML_ROUTES.items()}
        for route in app_routes:
            if "{" not in route.path:
                self.exact.setdefault(route.path, set()).update(getattr(route, "methods", None) or {"GET"})
        self.static = {f"/static_content/{p.relative_to(BENTOML_STATIC)}" for p in BENTOML_STATIC.rglob("*") if p.is_file()}

    def match(self, path: str) -> tuple[str, set[str]] | None:
        """(label, methods) for a path this service answers, or None."""
        methods = self.exact.get(path)
        if methods is not None:
            return path, methods
        if path in self.static:
            return "/static_content", {"GET", "HEAD"}
        if path.startswith("/v2/models/"):
            v2 = open_inference.parse_model_path(path.removeprefix("/v2/models/"))
            if v2 is None:  # an unknown model name goes on: the route names the model this server serves
                return None
            return f"/v2/models/{{model}}{'/' + v2.verb if v2.verb else ''}", {"POST"} if v2.verb == "infer" else {"GET"}
        route = tfserving.parse_model_path(path.removeprefix("/v1/models/")) if path.startswith("/v1/models/") else None
        if route is None or route.name != tfserving.MODEL_NAME:
            return None
        if route.verb in ("predict", "classify", "regress"):  # the last two: TF Serving's 400, from the route
            return f"/v1/models/{{model}}:{route.verb}", {"POST"}
        if route.verb in (None, "metadata"):
            return f"/v1/models/{{model}}{'/metadata' if route.verb else ''}", {"GET"}
        return None

    def label(self, path: str) -> str | None:
        """The route template a path is counted under in metrics, or None for an unknown path."""
        matched = self.match(path)
        return matched[0] if matched else None


class Admission:
    """A worker's limits on the requests it holds: each body read within time and size, the bodies held
    at once under a budget, then one of ``max_concurrency`` slots. One per worker, shared by
    :class:`Edge` and the hot routes' fast lane (:class:`FastLane`), so the limits
    count every request whichever way it came in."""

    def __init__(self, limits: EdgeLimits) -> None:
        self.limits = limits
        self.slots = asyncio.Semaphore(limits.max_concurrency)
        self._body_deadlines = TaskDeadlines(limits.body_timeout_s)
        self._body_budget = limits.max_body_bytes_in_flight or 4 * limits.max_body_bytes
        self._bodies_in_flight = 0  # bytes of request bodies this worker holds now

    def too_many(self) -> tuple[int, str] | None:
        """The 429 to answer when every slot is taken (no queueing: the client backs off), else None."""
        if not self.slots.locked():
            return None
        return 429, f"too many requests in flight (at most {self.limits.max_concurrency}); retry with backoff"

    def release(self, held: list[int]) -> None:
        """Give back the body bytes :meth:`read_body` counted in ``held``."""
        self._bodies_in_flight -= held[0]

    async def read_body(self, receive: Callable, held: list[int]) -> bytes | tuple[int, str]:
        """The whole body, or (status, message) when it is too slow, too large, or more than this
        worker's budget for bodies in flight; ``held[0]`` counts the bytes it took from that budget
        (give them back with :meth:`release`)."""
        limit, parts, size = self.limits.max_body_bytes, [], 0
        task = asyncio.current_task()
        self._body_deadlines.arm(task)  # a dict entry, not a timer (service.deadlines)
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return 400, "the client disconnected before sending the whole body"
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    return 413, f"request body is over the limit of {limit} bytes"
                if self._bodies_in_flight + len(chunk) > self._body_budget:
                    return 503, "the server holds too many request bodies at once; retry shortly"
                self._bodies_in_flight += len(chunk)
                held[0] += len(chunk)
                parts.append(chunk)
                if not message.get("more_body", False):
                    return parts[0] if len(parts) == 1 else b"".join(parts)
        except asyncio.CancelledError:
            if not self._body_deadlines.expired(task):
                raise
            return 408, f"the request body did not arrive within {self.limits.body_timeout_s:g} s"
        finally:
            self._body_deadlines.disarm(task)


def refusal_headers(status: int) -> list[tuple[bytes, bytes]]:
    """Headers of an admission refusal: the connection is closed after a body that was not read whole;
    Retry-After where trying again shortly helps."""
    if status == 429:
        return [(b"retry-after", b"1")]
    return [(b"connection", b"close"), *([(b"retry-after", b"1")] if status == 503 else [])]


class Edge:
    """Raw ASGI, outermost of the service's own middlewares (inside BentoML's request timeout)."""

    def __init__(
        self, app: Callable, limits: EdgeLimits, routes: Callable[[], RouteTable], admission: Admission | None = None
    ) -> None:
        self.app = app
        self.limits = limits
        self._routes = routes
        self._table: RouteTable | None = None
        self.admission = admission or Admission(limits)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self._table is None:
            self._table = self._routes()
        if "digits.path" in scope:  # shown to the metrics middleware as its route label
            scope["path"] = scope.pop("digits.path")
        path, method = scope["path"], scope["method"]
        matched = self._table.match(path)
        extra = [NOSNIFF, (b"content-security-policy", DRAW_CSP.encode())] if path == "/draw" else [NOSNIFF]

        async def send_with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        if matched is None:
            return await _answer(send_with_headers, 404, f"no such endpoint: {method} {path}")
        if method not in matched[1] and not (method == "HEAD" and "GET" in matched[1]):
            if path.startswith("/v1/models/"):  # TensorFlow Serving's answer to a method its REST API lacks
                return await _answer(send_with_headers, 400, f"Malformed request: {method} {path}")
            allow = ", ".join(sorted(matched[1]))
            return await _answer(
                send_with_headers, 405, f"{method} is not allowed on {path}; use {allow}", [(b"allow", allow.encode())]
            )
        if path in PROBES or path in V2_PROBES:
            return await self.app(scope, receive, send_with_headers)
        if method in METHODS_WITH_BODY:
            held = [0]
            try:
                outcome = await self.admission.read_body(receive, held)
                if isinstance(outcome, tuple):
                    return await _answer(send_with_headers, *outcome, refusal_headers(outcome[0]))
                scope["digits.body"] = outcome  # read once: the hot routes take it from here
                return await self._admit(scope, _replay(outcome, receive), send_with_headers)
            finally:
                self.admission.release(held)
        return await self._admit(scope, receive, send_with_headers)

    async def _admit(self, scope: dict, receive: Callable, send_with_headers: Callable) -> None:
        if refused := self.admission.too_many():
            return await _answer(send_with_headers, *refused, refusal_headers(refused[0]))
        async with self.admission.slots:
            await self.app(scope, receive, send_with_headers)


def _replay(body: bytes, receive: Callable) -> Callable:
    """A ``receive`` that hands over the already-read body once, then waits on the client as before."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _answer(send: Callable, status: int, message: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    payload = error_body(message)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": payload})


# -- the hot routes, in front of everything ------------------------------------------------------


class FastLane:
    """The hot routes answered in front of everything else in a worker: the outermost ASGI app
    (:func:`service.framework_patches.put_in_front`), ahead of uvicorn's proxy-headers layer and of the
    layers BentoML builds around the service's own (Starlette's two error handlers, request metrics,
    OpenTelemetry, the request deadline, the request context), each of which wrapped ``send`` or
    ``receive`` and ran its own coroutine for every prediction.

    It does for these routes what those layers and the edge did, once: BentoML's request metrics (the
    same samples, recorded through BentoML's own middleware, ``LIVE_METRICS``), the response deadline
    (``SERVICE_TIMEOUT_S``, 504), the edge's admission (the body within ``CLIENT_BODY_TIMEOUT_S`` and
    ``MAX_BODY_BYTES`` and the worker's budget for bodies in flight, then a slot: 408/413/503/429) and
    its ``nosniff`` header, then :class:`HotRoutes`' answer. Everything else goes to ``app`` as before,
    as do these routes until the worker has its model.
    """

    def __init__(
        self,
        app: Callable,
        hot: HotRoutes,
        admission: Admission,
        deadline: ResponseDeadline,
        label: Callable[[str], str | None],
        metrics: list[Any],
    ) -> None:
        self.app, self.hot, self.admission, self.deadline = app, hot, admission, deadline
        self.labels = {path: label(path) or path for path in HOT_ROUTES}
        self._metrics = metrics  # BentoML's metrics middleware once it is built (none: metrics are off)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        handler = HOT_ROUTES.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if handler is None or getattr(self.hot.state, "core", None) is None:
            return await self.app(scope, receive, send)
        metrics = self._metrics[0] if self._metrics else None
        label = self.labels[scope["path"]]
        started = metrics.started(label) if metrics is not None else 0.0
        scope["digits.hot"] = handler
        try:
            answered = await self.deadline.within(self._serve, scope, receive, send)
            status = scope.get("digits.status") if answered else 504
            if metrics is not None and status is not None:
                metrics.answered(label, status, started)
        finally:
            if metrics is not None:
                metrics.finished(label)

    async def _serve(self, scope: dict, receive: Callable, send: Callable) -> None:
        held = [0]
        try:
            body = await self.admission.read_body(receive, held)
            if isinstance(body, tuple):
                status, message = body
                return await self._send(scope, send, (status, [JSON_HEADER, *refusal_headers(status)], error_body(message)))
            if refused := self.admission.too_many():
                status, message = refused
                return await self._send(scope, send, (status, [JSON_HEADER, *refusal_headers(status)], error_body(message)))
            async with self.admission.slots:
                response = await self.hot.answer(scope, scope["digits.hot"], body)
                if response is not None:
                    await self._send(scope, send, response)
        finally:
            self.admission.release(held)

    @staticmethod
    async def _send(scope: dict, send: Callable, response: Response) -> None:
        status, headers, payload = response
        scope["digits.status"] = status
        headers.append(NOSNIFF)
        await send_response(send, status, headers, payload)


# -- headers in bounded time ----------------------------------------------------------------------


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus a deadline for each request's headers.

    uvicorn bounds only the idle time between requests, and even that timer stops at the first byte
    of a new request, so a client trickling a header line now and then holds a connection forever.
    The deadlines of a worker's connections are kept by one :class:`service.deadlines.Sweeper`, not a
    timer per request, so a slow client gets its 408 within a tenth of the timeout (at most 1 s) after it.
    Installed by :func:`service.framework_patches.install_header_timeout`.
    """

    header_timeout_s: float = 10.0
    _waiting_for_headers: Sweeper | None = None  # one per worker, made at the first connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        cls = type(self)
        if cls._waiting_for_headers is None:
            cls._waiting_for_headers = Sweeper(tick_for(self.header_timeout_s), HeaderTimeoutProtocol._headers_too_slow)
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.pipeline and not self.transport.is_closing():
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._waiting_for_headers.arm(self, self.loop, self.header_timeout_s)

    def _cancel_header_timer(self) -> None:
        if self._waiting_for_headers is not None:
            self._waiting_for_headers.disarm(self)

    def _headers_too_slow(self) -> None:
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return
        payload = error_body(f"the request headers did not arrive within {self.header_timeout_s:g} s")
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            b"x-content-type-options: nosniff\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(payload), payload)
        )
        self.transport.close()
