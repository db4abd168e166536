"""The Digits service: BentoML's lifecycle around one serving core, reached over HTTP and gRPC.

    bentoml serve service:Digits --port 3000        (from the repo root; settings in docs/service.md)

Routes live in :mod:`service.http` (with :mod:`service.admin`, and :mod:`service.hot_path` answering
the prediction routes before any router) and :mod:`service.grpc_api`; all call :class:`ServingCore`,
whose batcher lets requests from every route share model calls.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import bentoml

from service import admin, compute, edge, framework_patches, hot_path, http
from service.bentoml_api import predict_api
from service.core import ServingCore
from service.errors import ClientErrorLog, ThrottledMessage
from service.feedback import FeedbackStore
from service.metrics import (
    ChallengerObserver,
    PrometheusBatchObserver,
    ShadowMetrics,
    challenger_switched,
    model_switched,
)
from service.rollout import Rollout
from service.runtime import ModelLoadError, ModelRuntime
from service.settings import SETTINGS
from service.webhooks import SiblingReloads, WebhookVerifier

logger = logging.getLogger("digits")
# Whose X-Forwarded-For uvicorn believes (it sets each request's client address, which the admin
# failed-attempt limit counts by): only TRUSTED_PROXIES', not uvicorn's default of loopback, which let
# any local client pick its own address.
os.environ["FORWARDED_ALLOW_IPS"] = SETTINGS.trusted_proxies
THREADS = compute.threads_from_env()  # checked here, so a bad value stops the server before any worker


admin.add_routes(http.app)


@bentoml.asgi_app(http.app, path="/")
@bentoml.service(name="digits", **SETTINGS.bentoml_config())
class Digits:
    def __init__(self) -> None:
        # Only workers build this class: BentoML's main process imports this module to read the
        # declarations and never serves, so it does without TensorFlow (~7 s of CPU and ~0.6 GB, measured).
        framework_patches.import_tensorflow_without_keras()  # before anything else imports it, quietly
        compute.configure_threads(*THREADS)  # before TensorFlow runs its first op
        runtime = ModelRuntime(
            SETTINGS.model_uri,
            SETTINGS.tracking_uri,
            SETTINGS.reload_poll_seconds,
            SETTINGS.registry_timeout_s,
            on_switch=model_switched,
            precision=SETTINGS.model_precision,
            warmup_batch_sizes=SETTINGS.warmup_sizes,
        )
        try:
            info = runtime.start()
        except ModelLoadError as exc:
            logger.critical("cannot start: no model to serve: %s", exc)
            raise SystemExit(3) from None
        logger.info("serving %s version %s (%s)", info.name, info.version, info.source)
        champion = ServingCore(runtime, observer=PrometheusBatchObserver(), **SETTINGS.batcher_limits())
        self.challenger = self._challenger() if SETTINGS.challenger_mode != "off" else None
        if self.challenger is None:
            self.core: ServingCore | Rollout = champion
        else:
            self.core = Rollout(
                champion,
                self.challenger,
                SETTINGS.challenger_mode,
                SETTINGS.canary_percent,
                SETTINGS.shadow_max_queue_images,
                observer=ShadowMetrics(),
                shadow_percent=SETTINGS.shadow_percent,
            )
        http.app.state.core, http.app.state.settings, http.app.state.threads = self.core, SETTINGS, THREADS
        http.app.state.image_decodes = asyncio.Semaphore(SETTINGS.image_decode_concurrency)
        if SETTINGS.feedback:  # the drawing page's corrections, kept for review and training
            http.app.state.feedback = FeedbackStore(
                Path(SETTINGS.feedback_dir), SETTINGS.feedback_max_bytes, SETTINGS.feedback_per_minute
            )
        if SETTINGS.webhook_secret:  # registry events reload at once, in every worker of this replica
            siblings = SiblingReloads()
            siblings.watch(self._reload_all)
            http.app.state.webhooks = (WebhookVerifier(SETTINGS.webhook_secret), siblings)
        self.grpc = None
        if SETTINGS.grpc_port:
            from service.grpc_api import GrpcFront  # its TF Serving messages import TensorFlow: workers only

            self.grpc = GrpcFront(self.core, SETTINGS.grpc_port, SETTINGS.max_images_per_request, SETTINGS.grpc_max_message_bytes)
        # TensorFlow, MLflow and BentoML leave ~0.5 M long-lived objects; a full collection walks them
        # all (~200 ms, measured), a stall every few seconds under load. Freezing them keeps the
        # collector to what requests allocate.
        gc.collect()
        gc.freeze()

    def _reload_all(self) -> None:
        """Another worker received a registry event: take whatever each alias names now."""
        for core in (self.core, self.challenger):
            if core is None:
                continue
            try:
                core.runtime.reload()
            except Exception as exc:  # keep serving what is loaded; polling is the fallback
                logger.warning("reload after a registry event failed for %s: %s", core.runtime.model_uri, exc)

    @staticmethod
    def _challenger() -> ServingCore:
        """The challenger beside the champion: its own runtime (following CHALLENGER_URI) and batch queue.
        No challenger yet is no error: the champion answers alone until the alias appears."""
        runtime = ModelRuntime(
            SETTINGS.challenger_uri,
            SETTINGS.tracking_uri,
            SETTINGS.reload_poll_seconds,
            SETTINGS.registry_timeout_s,
            on_switch=challenger_switched(SETTINGS.challenger_mode),
            precision=SETTINGS.model_precision,
            warmup_batch_sizes=SETTINGS.warmup_sizes,
        )
        try:
            info = runtime.start()
            logger.info("%s challenger: %s version %s", SETTINGS.challenger_mode, info.name, info.version)
        except ModelLoadError as exc:
            logger.warning("no challenger to run beside the champion yet (%s); polling for one", exc)
            runtime.start_polling()
        observer = ChallengerObserver(counts_answers=SETTINGS.challenger_mode == "canary")
        return ServingCore(runtime, observer=observer, **SETTINGS.batcher_limits())

    @bentoml.on_deployment
    def check_model_source() -> None:
        """Runs once in the main process before any worker: no model, no server (one clear line)."""
        try:
            found = ModelRuntime(
                SETTINGS.model_uri, SETTINGS.tracking_uri, registry_timeout_s=SETTINGS.registry_timeout_s
            ).check()
        except ModelLoadError as exc:
            print(f"digits: cannot start, no model to serve: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(3) from None
        print(f"digits: will serve {found} ({SETTINGS.model_uri})", file=sys.stderr, flush=True)

    @bentoml.on_startup
    async def start_grpc(self) -> None:
        if self.grpc:
            await self.grpc.start(SETTINGS.grpc_host)

    def __is_ready__(self) -> bool:
        return self.core.runtime.ready

    @bentoml.on_shutdown
    async def shutdown(self) -> None:
        if self.grpc:
            await self.grpc.stop()
        self.core.close()
        self.core.runtime.stop()
        if self.challenger is not None:
            self.challenger.runtime.stop()

    # the typed declaration BentoML's clients and /schema.json read; HotRoutes answers the route
    predict = predict_api(SETTINGS.max_images_per_request)


framework_patches.install(SETTINGS.client_header_timeout_s, SETTINGS.workers)
_uvicorn_log = logging.getLogger("uvicorn.error")
_uvicorn_log.addFilter(ThrottledMessage("Invalid HTTP request received.", ClientErrorLog(_uvicorn_log)))
framework_patches.label_metrics_by_route(lambda: edge.RouteTable(http.app.routes).label)
LIMITS = edge.EdgeLimits(
    SETTINGS.max_body_bytes, SETTINGS.client_body_timeout_s, SETTINGS.max_concurrency, SETTINGS.max_body_bytes_in_flight
)
ADMISSION = edge.Admission(LIMITS)  # this worker's, whichever way a request comes in
Digits.add_asgi_middleware(edge.Edge, limits=LIMITS, routes=lambda: edge.RouteTable(http.app.routes), admission=ADMISSION)
Digits.add_asgi_middleware(hot_path.HotRoutes, state=http.app.state)


def _fast_lane(app: Callable) -> Callable:
    """The prediction routes answered ahead of BentoML's layers (:class:`service.edge.FastLane`), unless
    a feature that lives in those layers is on: tracing, the access log, CORS."""
    needs_bentoml = {"TRACING": SETTINGS.tracing, "ACCESS_LOG": SETTINGS.access_log}
    needs_bentoml["CORS"] = framework_patches.bentoml_cors_enabled()
    if any(needs_bentoml.values()):
        on = ", ".join(name for name, wanted in needs_bentoml.items() if wanted)
        print(f"digits: prediction routes: through BentoML's middlewares ({on} on)", file=sys.stderr, flush=True)
        return app
    print("digits: prediction routes: fast lane, in front of BentoML's middlewares", file=sys.stderr, flush=True)
    deadline = framework_patches.ResponseDeadline(app, SETTINGS.timeout_s)
    label = edge.RouteTable(http.app.routes).label
    hot = hot_path.HotRoutes(None, http.app.state)
    return edge.FastLane(app, hot, ADMISSION, deadline, label, framework_patches.LIVE_METRICS)


framework_patches.put_in_front(_fast_lane)
