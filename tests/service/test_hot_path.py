"""The prediction routes' raw-ASGI front (service.hot_path.HotRoutes) and the fast lane in front of
BentoML's layers (service.edge.FastLane) in-process, over a real serving core and batcher with a
stand-in model: answers, version headers, errors as JSON, batching, pass-through, the edge's limits."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import numpy as np
import orjson
import pytest

from service import http
from service.core import ServingCore
from service.edge import Admission, EdgeLimits, FastLane, RouteTable
from service.framework_patches import ResponseDeadline
from service.hot_path import HotRoutes
from service.runtime import LoadedModel, ModelInfo, Prediction

MAX_BODY_BYTES = 64 * 1024


class SumDigit:
    """A model runtime whose digit for an image is the sum of its pixels mod 10 (so every image has its
    own, checkable answer); ``ready=False`` is a worker before its first load, ``fail`` a broken model."""

    def __init__(self, version: str = "7", ready: bool = True, fail: bool = False) -> None:
        self.version, self.ready, self.fail = version, ready, fail
        self.batch_sizes: list[int] = []

    @property
    def current(self) -> LoadedModel:
        info = ModelInfo("mnist-cnn", self.version, "champion", None, None, "test", "test", "now")
        return LoadedModel(info=info, serve=None, key=self.version, signature_defs={})

    def predict(self, pixels: np.ndarray) -> Prediction:
        self.batch_sizes.append(len(pixels))
        if self.fail:
            raise RuntimeError("the model exploded")
        digits = pixels.astype(np.int64).sum(axis=(1, 2)) % 10
        probabilities = np.eye(10, dtype=np.float32)[digits]
        return Prediction(probabilities, digits, self.current.info)


def expected_digit(image: np.ndarray) -> int:
    return int(image.astype(np.int64).sum() % 10)


class Front:
    """HotRoutes over a serving core, with an inner app that records what reached it."""

    def __init__(self, runtime: SumDigit) -> None:
        self.runtime = runtime
        # max_wait_s is a queue-time budget past which a request is refused: generous, so a busy machine
        # cannot fail these tests
        self.core = ServingCore(runtime, max_batch_images=64, max_wait_s=10, max_queue_images=1000)  # type: ignore[arg-type]
        settings = SimpleNamespace(max_body_bytes=MAX_BODY_BYTES, max_images_per_request=8)
        self.passed_on: list[str] = []
        self.hot = HotRoutes(self._inner, state=SimpleNamespace(core=self.core, settings=settings))

    async def _inner(self, scope: dict, receive, send) -> None:
        self.passed_on.append(f"{scope['method']} {scope['path']}")
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def request(
        self, path: str, body: bytes, content_type: str | None = "application/json", method: str = "POST", **scope: object
    ) -> tuple[int, dict[bytes, bytes], bytes]:
        headers = [(b"content-length", str(len(body)).encode())]
        if content_type is not None:
            headers.append((b"content-type", content_type.encode()))
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        sent: list[dict] = []

        async def receive() -> dict:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        http_scope = {"type": "http", "method": method, "path": path, "headers": headers, **scope}
        await self.hot(http_scope, receive, send)
        start = sent[0]
        return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


def run(coroutine):
    return asyncio.run(coroutine)


def images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 28, 28), dtype=np.uint8)


def test_one_image_and_a_list_get_their_own_digits_and_the_version():
    front = Front(SumDigit(version="7"))
    batch = images(3)

    async def both():
        one = await front.request("/predict", orjson.dumps(batch[0].tolist()))
        many = await front.request("/predict", orjson.dumps(batch.tolist()))
        return one, many

    (status, headers, body), (many_status, _, many_body) = run(both())
    assert status == 200 and headers[b"x-model-version"] == b"7" and headers[b"content-type"] == b"application/json"
    (answer,) = orjson.loads(body)
    assert answer["digit"] == expected_digit(batch[0]) and answer["model_version"] == "7"
    assert len(answer["probabilities"]) == 10 and answer["probabilities"][answer["digit"]] == 1.0
    assert many_status == 200 and [a["digit"] for a in orjson.loads(many_body)] == [expected_digit(i) for i in batch]
    front.core.close()


def test_tf_serving_rest_takes_any_content_type_and_answers_in_its_format():
    front = Front(SumDigit())
    batch = images(2, seed=1)
    status, _, body = run(
        front.request("/v1/models/mnist:predict", orjson.dumps({"instances": batch.tolist()}), content_type=None)
    )
    assert status == 200
    assert [p["digit"] for p in orjson.loads(body)["predictions"]] == [expected_digit(i) for i in batch]
    front.core.close()


def test_the_body_the_edge_already_read_is_used_without_reading_again():
    front = Front(SumDigit())
    image = images(1, seed=2)[0]
    status, _, body = run(front.request("/predict", b"", **{"digits.body": orjson.dumps(image.tolist())}))
    assert status == 200 and orjson.loads(body)[0]["digit"] == expected_digit(image)
    front.core.close()


@pytest.mark.parametrize(
    ("body", "content_type", "status", "message"),
    [
        (b"[[1, 2]]", "application/json", 400, "28"),
        (b"[[1, 2", "application/json", 400, "JSON"),
        (b"", "application/json", 400, "empty request body"),
        (b"[0]", "text/plain", 415, "send application/json"),
        (orjson.dumps(images(9).tolist()), "application/json", 400, "at most 8"),
        (b"0" * (MAX_BODY_BYTES + 1), "application/json", 413, "over the limit"),
    ],
)
def test_bad_requests_get_a_json_error_and_the_front_keeps_answering(body, content_type, status, message):
    front = Front(SumDigit())
    got, headers, payload = run(front.request("/predict", body, content_type))
    assert got == status and headers[b"content-type"] == b"application/json"
    assert message in orjson.loads(payload)["error"]
    again, _, _ = run(front.request("/predict", orjson.dumps(images(1)[0].tolist())))
    assert again == 200
    front.core.close()


def test_no_model_yet_is_503_and_a_broken_model_is_500_without_its_exception():
    waiting = Front(SumDigit(ready=False))
    status, _, body = run(waiting.request("/predict", orjson.dumps(images(1)[0].tolist())))
    assert status == 503 and "no model is loaded yet" in orjson.loads(body)["error"]
    broken = Front(SumDigit(fail=True))
    status, _, body = run(broken.request("/predict", orjson.dumps(images(1)[0].tolist())))
    assert status == 500 and orjson.loads(body) == {"error": "internal error; see the service log"}
    waiting.core.close()
    broken.core.close()


def test_other_routes_and_methods_go_on_to_the_app():
    front = Front(SumDigit())
    run(front.request("/predict", b"", method="GET"))
    run(front.request("/model", b"{}"))
    assert front.passed_on == ["GET /predict", "POST /model"]
    assert front.runtime.batch_sizes == []
    front.core.close()


def test_concurrent_requests_share_model_calls_and_each_gets_its_own_answer():
    front = Front(SumDigit())
    batch = images(24, seed=3)

    async def all_at_once():
        return await asyncio.gather(*(front.request("/predict", orjson.dumps(image.tolist())) for image in batch))

    results = run(all_at_once())
    assert [orjson.loads(body)[0]["digit"] for _, _, body in results] == [expected_digit(i) for i in batch]
    assert sum(front.runtime.batch_sizes) == 24 and len(front.runtime.batch_sizes) < 24, front.runtime.batch_sizes
    front.core.close()


# -- the fast lane: the same routes answered in front of BentoML's layers, with the edge's limits ----


class CountedRequests:
    """Records what the fast lane tells BentoML's metrics middleware (its ``started``/``answered``/
    ``finished``, as ``framework_patches.label_metrics_by_route`` gives it); the real one is checked
    through a running service in ``test_service.py``."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def started(self, label: str) -> float:
        self.events.append(("started", label))
        return 0.0

    def answered(self, label: str, status: int, started: float) -> None:
        self.events.append(("answered", label, status))

    def finished(self, label: str) -> None:
        self.events.append(("finished", label))


class SlowDigit(SumDigit):
    def predict(self, pixels: np.ndarray) -> Prediction:
        time.sleep(0.5)
        return super().predict(pixels)


class Lane(Front):
    """A FastLane in front of an app that records what reached it, over a real core and batcher."""

    def __init__(self, runtime: SumDigit, limits: EdgeLimits, timeout_s: float = 30, core: bool = True) -> None:
        super().__init__(runtime)
        self.metrics = CountedRequests()
        state = self.hot.state if core else SimpleNamespace()
        self.lane = FastLane(
            self._inner,
            HotRoutes(None, state),
            Admission(limits),
            ResponseDeadline(None, timeout_s),
            RouteTable(http.app.routes).label,
            [self.metrics],
        )

    async def request(self, path: str, body: bytes, method: str = "POST", chunks: list | None = None):
        messages = chunks or [{"type": "http.request", "body": body, "more_body": False}]
        sent: list[dict] = []

        async def receive() -> dict:
            if not messages:
                await asyncio.sleep(3600)
            message = messages.pop(0)
            if message.get("delay"):
                await asyncio.sleep(message.pop("delay"))
            return message

        async def send(message: dict) -> None:
            sent.append(message)

        headers = [(b"content-type", b"application/json")]
        await self.lane({"type": "http", "method": method, "path": path, "headers": headers}, receive, send)
        start = sent[0]
        return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


LANE_LIMITS = EdgeLimits(max_body_bytes=8 * 1024, body_timeout_s=0.3, max_concurrency=2)


def test_the_fast_lane_answers_the_hot_routes_itself_with_nosniff_and_counts_each_under_its_route():
    lane = Lane(SumDigit(version="7"), LANE_LIMITS)
    image = images(1, seed=4)[0]

    async def both():
        return (
            await lane.request("/predict", orjson.dumps(image.tolist())),
            await lane.request("/v1/models/mnist:predict", orjson.dumps({"instances": [image.tolist()]})),
            await lane.request("/predict", b"[[1, 2]]"),
        )

    (status, headers, body), (tf_status, _, tf_body), (bad, bad_headers, bad_body) = run(both())
    assert status == 200 and orjson.loads(body)[0]["digit"] == expected_digit(image)
    assert headers[b"x-model-version"] == b"7" and headers[b"x-content-type-options"] == b"nosniff"
    assert int(headers[b"content-length"]) == len(body)
    assert tf_status == 200 and orjson.loads(tf_body)["predictions"][0]["digit"] == expected_digit(image)
    assert bad == 400 and "28" in orjson.loads(bad_body)["error"] and bad_headers[b"x-content-type-options"] == b"nosniff"
    assert lane.passed_on == []
    tf = "/v1/models/{model}:predict"
    assert lane.metrics.events == [
        ("started", "/predict"),
        ("answered", "/predict", 200),
        ("finished", "/predict"),
        ("started", tf),
        ("answered", tf, 200),
        ("finished", tf),
        ("started", "/predict"),
        ("answered", "/predict", 400),
        ("finished", "/predict"),
    ]
    lane.core.close()


def test_other_requests_and_a_worker_without_its_core_yet_go_on_to_the_stack():
    lane = Lane(SumDigit(), LANE_LIMITS)
    run(lane.request("/model", b""))
    run(lane.request("/predict", b"", method="GET"))
    assert lane.passed_on == ["POST /model", "GET /predict"] and lane.metrics.events == []
    starting = Lane(SumDigit(), LANE_LIMITS, core=False)
    run(starting.request("/predict", orjson.dumps(images(1)[0].tolist())))
    assert starting.passed_on == ["POST /predict"]
    lane.core.close()
    starting.core.close()


@pytest.mark.parametrize(
    ("chunks", "status", "message"),
    [
        ([{"type": "http.request", "body": b"0" * (8 * 1024 + 1), "more_body": False}], 413, "over the limit of 8192 bytes"),
        ([{"type": "http.request", "body": b"[", "more_body": True}], 408, "did not arrive within 0.3 s"),
        ([{"type": "http.disconnect"}], 400, "disconnected"),
    ],
    ids=["too large", "too slow", "gone"],
)
def test_the_fast_lane_keeps_the_edges_body_limits(chunks, status, message):
    lane = Lane(SumDigit(), LANE_LIMITS)
    got, headers, body = run(lane.request("/predict", b"", chunks=chunks))
    assert got == status and message in orjson.loads(body)["error"]
    assert headers[b"connection"] == b"close" and headers[b"x-content-type-options"] == b"nosniff"
    assert lane.metrics.events[1] == ("answered", "/predict", status)
    assert lane.runtime.batch_sizes == [] and lane.passed_on == []
    lane.core.close()


def test_the_fast_lane_answers_429_when_every_slot_is_taken_and_504_past_the_deadline():
    lane = Lane(SlowDigit(), LANE_LIMITS, timeout_s=5)
    body = orjson.dumps(images(1)[0].tolist())

    async def three_at_once():
        return await asyncio.gather(*(lane.request("/predict", body) for _ in range(3)))

    statuses = sorted(status for status, _, _ in run(three_at_once()))
    assert statuses == [200, 200, 429]
    late = Lane(SlowDigit(), LANE_LIMITS, timeout_s=0.1)
    status, _, answer = run(late.request("/predict", body))
    assert status == 504 and "0.1 seconds" in orjson.loads(answer)["error"]
    assert late.metrics.events == [("started", "/predict"), ("answered", "/predict", 504), ("finished", "/predict")]
    lane.core.close()
    late.core.close()
