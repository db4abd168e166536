"""The service's own Prometheus metrics (served on ``/metrics`` beside BentoML's)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import bentoml

if TYPE_CHECKING:
    from service.runtime import ModelInfo

batch_images = bentoml.metrics.Histogram(
    name="digits_model_batch_images",
    documentation="Images per model call (batching merges concurrent requests from every route)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
)
batch_routes = bentoml.metrics.Histogram(
    name="digits_model_batch_routes",
    documentation="Distinct routes (HTTP JSON, image upload, TF Serving REST, gRPC) whose requests shared a model call",
    buckets=(1, 2, 3, 4),
)
model_call_seconds = bentoml.metrics.Histogram(
    name="digits_model_call_seconds",
    documentation="Seconds per model call",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
)
queue_wait_seconds = bentoml.metrics.Histogram(
    name="digits_queue_wait_seconds",
    documentation="Seconds a request waited in the batch queue before its model call, per route",
    labelnames=["route"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
)


model_info = bentoml.metrics.Gauge(
    name="digits_model_info",
    documentation="1 for the registered model version this server answers with (per worker process), 0 for one it left",
    labelnames=["name", "version"],
    multiprocess_mode="liveall",  # a process that exits takes its series with it
)


def model_switched(old: ModelInfo | None, new: ModelInfo) -> None:
    """``ModelRuntime``'s ``on_switch``: which version this process serves, for dashboards per replica."""
    if old is not None:
        model_info.labels(name=old.name, version=old.version).set(0)
    model_info.labels(name=new.name, version=new.version).set(1)


class PrometheusBatchObserver:
    """Feeds the batcher's observations into the histograms above."""

    def __init__(self) -> None:
        self._wait_by_route: dict = {}

    def model_call(self, images: int, routes: int, seconds: float) -> None:
        batch_images.observe(images)
        batch_routes.observe(routes)
        model_call_seconds.observe(seconds)

    def queued(self, route: str, seconds: float) -> None:
        histogram = self._wait_by_route.get(route)
        if histogram is None:  # label lookup once per route, not once per request
            histogram = self._wait_by_route[route] = queue_wait_seconds.labels(route=route)
        histogram.observe(seconds)
