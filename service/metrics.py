"""The service's own Prometheus metrics (served on ``/metrics`` beside BentoML's)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import bentoml
import grpc
import numpy as np

from contract import NUM_CLASSES

if TYPE_CHECKING:
    from service.runtime import ModelInfo, Prediction

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


predictions = bentoml.metrics.Counter(
    name="digits_predictions",
    documentation="Images answered, by model version and predicted digit (class shares, against the training prior)",
    labelnames=["version", "digit"],
)
confidence_sum = bentoml.metrics.Counter(
    name="digits_prediction_confidence_sum",
    documentation="Sum of the top probability of every answer, by model version: / digits_predictions is the mean confidence",
    labelnames=["version"],
)
low_confidence = bentoml.metrics.Counter(
    name="digits_low_confidence_predictions",
    documentation="Answers whose top probability was under 0.5, by model version",
    labelnames=["version"],
)
LOW_CONFIDENCE = 0.5


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
        self._by_version: dict = {}

    def model_call(self, images: int, routes: int, seconds: float) -> None:
        batch_images.observe(images)
        batch_routes.observe(routes)
        model_call_seconds.observe(seconds)

    def predicted(self, prediction: Prediction) -> None:
        """Class shares and confidence, per model call (a few counter increments, not one per image)."""
        version = prediction.model.version
        children = self._by_version.get(version)
        if children is None:
            children = self._by_version[version] = (
                [predictions.labels(version=version, digit=str(digit)) for digit in range(NUM_CLASSES)],
                confidence_sum.labels(version=version),
                low_confidence.labels(version=version),
            )
        per_digit, confidence, low = children
        for digit, count in enumerate(np.bincount(prediction.digits, minlength=NUM_CLASSES).tolist()):
            if count:
                per_digit[digit].inc(count)
        top = prediction.probabilities.max(axis=1)
        confidence.inc(float(top.sum()))
        unsure = int((top < LOW_CONFIDENCE).sum())
        if unsure:
            low.inc(unsure)

    def queued(self, route: str, seconds: float) -> None:
        histogram = self._wait_by_route.get(route)
        if histogram is None:  # label lookup once per route, not once per request
            histogram = self._wait_by_route[route] = queue_wait_seconds.labels(route=route)
        histogram.observe(seconds)


grpc_handled = bentoml.metrics.Counter(
    name="digits_grpc_server_handled",
    documentation="gRPC calls answered, by service, method and status code (TF Serving's and V2's services)",
    labelnames=["grpc_service", "grpc_method", "grpc_code"],
)
grpc_handling_seconds = bentoml.metrics.Histogram(
    name="digits_grpc_server_handling_seconds",
    documentation="Seconds from a gRPC call's request to its answer, by service and method",
    labelnames=["grpc_service", "grpc_method"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
)


class GrpcMethodMetrics:
    """One gRPC method's counter and histogram, label children looked up once (labels are bounded:
    services and methods from the protos, codes from ``grpc.StatusCode``)."""

    def __init__(self, service: str, method: str) -> None:
        self.service, self.method = service, method
        self.seconds = grpc_handling_seconds.labels(grpc_service=service, grpc_method=method)
        self._handled: dict[grpc.StatusCode, object] = {}
        self._counter(grpc.StatusCode.OK)  # every method's series exists from the start, at 0

    def _counter(self, code: grpc.StatusCode) -> object:
        counter = self._handled.get(code)
        if counter is None:
            labels = {"grpc_service": self.service, "grpc_method": self.method, "grpc_code": code.name}
            counter = self._handled[code] = grpc_handled.labels(**labels)
        return counter

    def __call__(self, code: grpc.StatusCode, seconds: float) -> None:
        self._counter(code).inc()
        self.seconds.observe(seconds)


# -- champion and challenger (CHALLENGER_MODE, service.rollout) ----------------------------------------

challenger_info = bentoml.metrics.Gauge(
    name="digits_challenger_info",
    documentation="1 for the challenger version this process runs beside the champion (shadow or canary), 0 for one it left",
    labelnames=["name", "version", "mode"],
    multiprocess_mode="liveall",
)
challenger_call_seconds = bentoml.metrics.Histogram(
    name="digits_challenger_model_call_seconds",
    documentation="Seconds per model call of the challenger (its own batch queue, beside the champion's)",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
)
shadow_compared = bentoml.metrics.Counter(
    name="digits_shadow_comparisons",
    documentation="Images answered by the champion and shadowed by the challenger, by both digits",
    labelnames=["champion_digit", "challenger_digit"],
)
shadow_agreed = bentoml.metrics.Counter(
    name="digits_shadow_agreements", documentation="Shadowed images on which champion and challenger gave the same digit"
)
shadow_dropped = bentoml.metrics.Counter(
    name="digits_shadow_dropped",
    documentation="Images not shadowed: the challenger's queue was full (SHADOW_MAX_QUEUE_IMAGES) or it failed",
)


class ChallengerObserver:
    """The challenger's batcher: its call latency; its answers counted per version only when it answers
    clients (canary), not for shadow copies."""

    def __init__(self, counts_answers: bool) -> None:
        self._answers = PrometheusBatchObserver() if counts_answers else None
        self._seconds = challenger_call_seconds

    def model_call(self, images: int, routes: int, seconds: float) -> None:
        self._seconds.observe(seconds)

    def queued(self, route: str, seconds: float) -> None:
        pass

    def predicted(self, prediction: Prediction) -> None:
        if self._answers is not None:
            self._answers.predicted(prediction)


class ShadowMetrics:
    """:class:`service.rollout.ShadowObserver` into Prometheus: agreement, disagreements by digit pair, drops."""

    def __init__(self) -> None:
        self._pairs: dict[tuple[int, int], object] = {}
        shadow_agreed.inc(0)  # both series from the start, at 0: a dashboard reads "none dropped", not "no data"
        shadow_dropped.inc(0)

    def compared(self, champion_digits: np.ndarray, challenger_digits: np.ndarray) -> None:
        pairs = np.bincount(champion_digits * NUM_CLASSES + challenger_digits, minlength=NUM_CLASSES * NUM_CLASSES)
        for pair in np.flatnonzero(pairs).tolist():
            key = divmod(pair, NUM_CLASSES)
            counter = self._pairs.get(key)
            if counter is None:
                counter = self._pairs[key] = shadow_compared.labels(champion_digit=str(key[0]), challenger_digit=str(key[1]))
            counter.inc(int(pairs[pair]))
        agreed = int((champion_digits == challenger_digits).sum())
        if agreed:
            shadow_agreed.inc(agreed)

    def dropped(self, images: int) -> None:
        shadow_dropped.inc(images)


def challenger_switched(mode: str):
    """``ModelRuntime``'s ``on_switch`` for the challenger."""

    def switched(old: ModelInfo | None, new: ModelInfo) -> None:
        if old is not None:
            challenger_info.labels(name=old.name, version=old.version, mode=mode).set(0)
        challenger_info.labels(name=new.name, version=new.version, mode=mode).set(1)

    return switched


feedbacks = bentoml.metrics.Counter(
    name="digits_feedback",
    documentation="Users' verdicts on answers (the drawing page), by model version: right or wrong (online accuracy)",
    labelnames=["version", "verdict"],
)


def feedback_received(version: str, right: bool) -> None:
    feedbacks.labels(version=version, verdict="right" if right else "wrong").inc()
