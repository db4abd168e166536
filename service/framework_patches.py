"""Every place the service changes BentoML's, uvicorn's or TensorFlow's behaviour, in one room, each
with its reason.

Each patch names the framework attribute it replaces and the version it was written against
(:data:`PATCHED`); ``tests/service/test_framework_patches.py`` fails, naming the patch, when one of
those attributes is gone, so an upgrade that moves them is caught in seconds rather than as a quiet
loss of the behaviour. :func:`install` applies the server's patches; it is called once, when
``service.service`` is imported (in BentoML's main process and in each worker, before the ASGI app is
built). :func:`import_tensorflow_without_keras` runs as each worker starts.
"""

from __future__ import annotations

import asyncio
import importlib
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bentoml
import uvicorn

import quiet
from service.deadlines import TaskDeadlines


@dataclass(frozen=True)
class Patch:
    name: str
    module: str
    attribute: str  # dotted inside the module
    written_for: str  # "package version"


PATCHED = (
    Patch(
        "request deadline without a timer left per request",
        "bentoml._internal.server.http.traffic",
        "TimeoutMiddleware",
        "bentoml 1.4.x",
    ),
    Patch(
        "request metrics labelled by route",
        "bentoml._internal.server.http.instruments",
        "RunnerTrafficMetricsMiddleware",
        "bentoml 1.4.x",
    ),
    Patch("a deadline for request headers", "uvicorn.config", "HTTP_PROTOCOLS", "uvicorn 0.54"),
    Patch("a listening socket per worker", "uvicorn.server", "Server.serve", "uvicorn 0.54"),
    Patch(
        "the fast lane stays off while BentoML's CORS is on",
        "bentoml._internal.configuration.containers",
        "BentoMLContainer.http",
        "bentoml 1.4.x",
    ),
    Patch("the hot routes in front of BentoML's middlewares", "uvicorn.config", "Config.load", "uvicorn 0.54"),
    Patch(
        "SavedModel signatures read without loading the model",
        "tensorflow.python.saved_model.loader_impl",
        "parse_saved_model",
        "tensorflow 2.21",
    ),
)
# What TensorFlow's __init__ imports "so that ... registration of optimizers in the SavedModel registry"
# happens; it tolerates an ImportError there (tensorflow 2.21: a try/except around the import)
KERAS_EAGER_IMPORT = "keras.src.optimizers"
# The worker's request metrics middleware, once BentoML has built it (label_metrics_by_route)
LIVE_METRICS: list[Any] = []
# BentoML serves its docs page's files from here; the edge lists them as known paths
BENTOML_STATIC = Path(bentoml.__file__).parent / "_internal" / "server" / "static_content"


def resolve(patch: Patch) -> Any:
    """The framework object a patch relies on (raises ImportError or AttributeError when it is gone)."""
    target: Any = importlib.import_module(patch.module)
    for part in patch.attribute.split("."):
        target = getattr(target, part)
    return target


def install(client_header_timeout_s: float, workers: int) -> None:
    """Apply the patches the service needs before BentoML builds its app (idempotent)."""
    replace_request_timeout()
    install_header_timeout(client_header_timeout_s)
    if workers > 1:
        listen_per_worker()


# -- TensorFlow without Keras ----------------------------------------------------------------------


def import_tensorflow_without_keras() -> None:
    """Import TensorFlow (quietly, :func:`quiet.import_tensorflow`) without the Keras it pulls in.

    ``import tensorflow`` imports all of Keras (``keras.src.optimizers``, and through Keras's wrappers
    scikit-learn): 3.3 s of the 9.3-9.6 s a worker spent importing TensorFlow and loading its
    SavedModel, which took 6.0 s without it (measured on 2 cores). A worker only loads SavedModels and
    calls their signature, which needs none of it. Keras stays importable afterwards; only this import is
    skipped. Written for tensorflow 2.21 (its ``__init__`` passes over an ImportError of
    :data:`KERAS_EAGER_IMPORT`); ``tests/service/test_framework_patches.py`` fails when it stops working.
    """
    if "keras" in sys.modules:  # already imported (in-process tests): nothing left to save
        quiet.import_tensorflow()
        return
    sys.modules[KERAS_EAGER_IMPORT] = None  # type: ignore[assignment]  # makes that import raise ImportError
    try:
        quiet.import_tensorflow()
    finally:
        if sys.modules.get(KERAS_EAGER_IMPORT, 0) is None:
            del sys.modules[KERAS_EAGER_IMPORT]


# -- the request deadline --------------------------------------------------------------------------


class ResponseDeadline:
    """BentoML's request timeout (``traffic.timeout``): a 504 JSON answer when no response has started
    within ``timeout`` seconds. Replaces ``TimeoutMiddleware``, which does the same but schedules a
    timer per request that it never cancels and runs each request in a task of its own.

    Those timers live for the whole timeout (`SERVICE_TIMEOUT_S`, 30 s), each holding a future: at 3,500 requests/s a worker
    held ~98,000 of them (and their futures, contexts and bound methods), ~590,000 objects that survive
    into the garbage collector's oldest generation and made every full collection a 100–270 ms stop
    (measured with ``gc.callbacks``: 36–44 such pauses per worker in 35 s of load) — the service's p99.
    Here a request costs a dict entry (:class:`service.deadlines.TaskDeadlines`): one sweep per tick (a
    tenth of the timeout, at most 1 s, so a deadline is kept within that) cancels the requests past
    their deadline, and only while any wait.
    """

    def __init__(self, app: Callable, timeout: float) -> None:
        self.app = app
        self.timeout = timeout
        self.deadlines = TaskDeadlines(timeout)  # one sweep per worker, a dict entry per request

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        await self.within(self.app, scope, receive, send)

    async def within(self, app: Callable, scope: dict, receive: Callable, send: Callable) -> bool:
        """Run the ASGI ``app`` under the deadline: False when it ran out and this answered 504."""
        task = asyncio.current_task()
        self.deadlines.arm(task)

        async def send_and_stop_the_clock(message: dict) -> None:
            self.deadlines.stop_clock(task)  # like BentoML's: the deadline is for the answer to start
            await send(message)

        try:
            await app(scope, receive, send_and_stop_the_clock)
            return True
        except asyncio.CancelledError:
            if not self.deadlines.expired(task):
                raise
            await _json_answer(send, 504, f"Not able to process the request in {self.timeout} seconds")
            return False
        finally:
            self.deadlines.disarm(task)


async def _json_answer(send: Callable, status: int, message: str) -> None:
    from service.errors import error_body

    payload = error_body(message)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def replace_request_timeout() -> None:
    from bentoml._internal.server.http import traffic

    traffic.TimeoutMiddleware = ResponseDeadline


# -- metrics labelled by route ---------------------------------------------------------------------


def label_metrics_by_route(match: Callable[[], Callable[[str], str | None]]) -> None:
    """Make BentoML's HTTP metrics middleware label requests by route template, not by raw path, and
    record an HTTP request at a fraction of its cost.

    BentoML 1.4 puts that middleware outside every user middleware and labels by ``scope["path"]``,
    so each distinct unknown path became a new time series, forever. This swaps in a subclass that
    uses the route's label (``match()`` builds, once, a function from a path to its label or None); the
    service's edge, the next middleware, puts the real path back from ``digits.path``. For HTTP it
    records the same samples in BentoML's own metric objects (``/metrics`` is unchanged) but looks each
    label set up once instead of five times per request (``.labels()`` validates and locks every
    call) and does not wrap ``receive`` (only websockets need that): with BentoML's middleware taken
    out entirely, the seed served 1.16x (10,054–10,400 -> 11,727–12,475 req/s, 2 workers).
    Websockets keep BentoML's code.
    """
    from bentoml._internal.context import server_context
    from bentoml._internal.server.http import instruments

    original = instruments.RunnerTrafficMetricsMiddleware
    if getattr(original, "labels_by_route", False):
        return
    matcher: list[Callable[[str], str | None]] = []

    class RouteLabelledMetrics(original):  # type: ignore[misc, valid-type]
        labels_by_route = True

        def _route_children(self, label: str) -> tuple[Any, Any]:
            """(in-progress gauge, last-request gauge or None) for a route label, looked up once."""
            cache = self.__dict__.setdefault("_route_children_cache", {})
            children = cache.get(label)
            if children is None:
                names = {"service_name": server_context.bento_name, "service_version": server_context.bento_version}
                names["runner_name"] = server_context.service_name
                last = None if label.startswith(tuple(self.skip_paths)) else self.metrics_last_request_timestamp.labels(**names)
                children = cache[label] = (self.metrics_request_in_progress.labels(endpoint=label, **names), last)
            return children

        def _status_children(self, label: str, status: int) -> tuple[Any, Any]:
            """(request counter, duration histogram) for a route label and status code, looked up once."""
            cache = self.__dict__.setdefault("_status_children_cache", {})
            children = cache.get((label, status))
            if children is None:
                names = {"endpoint": label, "service_name": server_context.bento_name}
                names |= {"service_version": server_context.bento_version, "http_response_code": status}
                names["runner_name"] = server_context.service_name
                children = cache[(label, status)] = (
                    self.metrics_request_total.labels(**names),
                    self.metrics_request_duration.labels(**names),
                )
            return children

        def __init__(self, app: Callable, *args: Any, **kwargs: Any) -> None:
            super().__init__(app, *args, **kwargs)
            LIVE_METRICS[:] = [self]  # one per worker: the hot routes' fast lane records through it

        def started(self, label: str) -> float:
            """Count a request on ``label`` as in progress; the start time to pass to :meth:`finished`."""
            if not self._is_setup:
                self._setup()
            in_progress, last_request = self._route_children(label)
            if last_request is not None:
                last_request.set(time.time())
            in_progress.inc()
            return time.perf_counter()

        def answered(self, label: str, status: int, started: float) -> None:
            """Count the answer (its status and duration) of a request :meth:`started` counted."""
            total, duration = self._status_children(label, status)
            total.inc()
            duration.observe(max(time.perf_counter() - started, 0.0))

        def finished(self, label: str) -> None:
            self._route_children(label)[0].dec()

        async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
            if scope["type"] != "http":
                return await super().__call__(scope, receive, send)
            if not matcher:
                matcher.append(match())
            label = matcher[0](scope["path"]) or "unmatched"
            scope["digits.path"], scope["path"] = scope["path"], label
            if label == "/metrics":
                return await self.app(scope, receive, send)
            started = self.started(label)
            status = 0

            async def send_counted(message: dict) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                elif message["type"] == "http.response.body" and not message.get("more_body", False):
                    self.answered(label, status, started)
                await send(message)

            try:
                await self.app(scope, receive, send_counted)
            finally:
                self.finished(label)

    instruments.RunnerTrafficMetricsMiddleware = RouteLabelledMetrics


# -- uvicorn: header deadline and a socket per worker ----------------------------------------------


def install_header_timeout(seconds: float) -> None:
    """Make uvicorn (as BentoML starts it, ``http="auto"``) use ``service.edge.HeaderTimeoutProtocol``."""
    from uvicorn import config

    from service.edge import HeaderTimeoutProtocol

    HeaderTimeoutProtocol.header_timeout_s = seconds
    config.HTTP_PROTOCOLS["auto"] = "service.edge:HeaderTimeoutProtocol"


def own_listener(shared: socket.socket) -> socket.socket:
    """A socket of this worker's own, bound to ``shared``'s address (``SO_REUSEPORT``) and not yet
    listening, after which ``shared`` stops listening, so the kernel spreads new connections over the
    workers' sockets.

    BentoML hands every worker one listening socket; each worker's event loop accepts whatever is
    pending when it wakes, so a burst of connections went mostly to one worker (64:0, 58:6, 15:49
    measured) and one core sat idle. ``shared`` is BentoML's socket (bound by its arbiter, inherited by
    every worker): it gets ``SO_REUSEPORT`` so that the workers may bind beside it, then
    ``shutdown`` takes it out of the listening group (Linux; the arbiter keeps it bound, so the port
    stays reserved). gRPC's server does the same per worker (``grpc.so_reuseport``).

    uvicorn makes the socket listen once the worker's startup (TensorFlow, the model, its warm-up) is
    done: a socket listening from the start took its share of new connections into a backlog nobody
    served for those seconds, the first requests after a start waited up to 0.8 s (p99 0.8 s in the
    first 2 s, 43-55 ms after), and so would every connection a restarting worker took.
    """
    shared.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    own = socket.socket(shared.family, socket.SOCK_STREAM)
    try:
        own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        own.bind(shared.getsockname())
    except OSError:
        own.close()
        raise
    try:
        shared.shutdown(socket.SHUT_RD)
    except OSError:  # another worker did it already
        pass
    return own


def listen_per_worker() -> None:
    """Give each uvicorn server (one per BentoML worker) its own ``SO_REUSEPORT`` listening socket."""
    _SERVE_WITH["per_worker_socket"] = True
    _patch_serve()


def bentoml_cors_enabled() -> bool:
    """Whether BentoML's configuration turns its CORS middleware on (``http.cors.enabled``)."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    return bool(BentoMLContainer.http.cors.enabled.get())


def put_in_front(wrap: Callable[[Callable], Callable]) -> None:
    """Make ``wrap(app)`` the outermost ASGI app of the uvicorn server each BentoML worker runs: in
    front of uvicorn's proxy-headers layer and every middleware BentoML builds (metrics, tracing,
    timeout, Starlette's error handlers), which a request otherwise crosses before any of the
    service's own code; ``wrap`` answers what it chooses and hands the rest to ``app``."""
    _SERVE_WITH["front"] = wrap
    _patch_serve()


_SERVE_WITH: dict[str, Any] = {}


def _patch_serve() -> None:
    original = uvicorn.Server.serve
    if getattr(original, "patched_by_digits", False):
        return

    async def serve(self: uvicorn.Server, sockets: list[socket.socket] | None = None) -> None:
        if (
            _SERVE_WITH.get("per_worker_socket")
            and sockets
            and len(sockets) == 1
            and sockets[0].family in (socket.AF_INET, socket.AF_INET6)
        ):
            sockets = [own_listener(sockets[0])]
        front = _SERVE_WITH.get("front")
        if front is not None and not getattr(self.config, "digits_front", False):
            if not self.config.loaded:
                self.config.load()
            self.config.loaded_app = front(self.config.loaded_app)
            self.config.digits_front = True
        await original(self, sockets)

    serve.patched_by_digits = True  # type: ignore[attr-defined]
    uvicorn.Server.serve = serve  # type: ignore[method-assign]
