"""The runtime batcher in-process: merging, limits, overload and model failures (no server, no TensorFlow)."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import numpy as np
import pytest

from service.batching import Batcher
from service.errors import Overloaded, ServiceError
from service.runtime import ModelInfo, Prediction

INFO = ModelInfo("mnist-cnn", "7", "champion", None, None, "test", "test", "now")


class Recorder:
    """A model stand-in that answers with each image's mean pixel, records call sizes and can be slowed."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        self.calls: list[int] = []
        self.delay_s = delay_s
        self.fail = fail
        self.release = threading.Event()

    def __call__(self, pixels: np.ndarray) -> Prediction:
        self.calls.append(len(pixels))
        time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("model exploded")
        means = pixels.reshape(len(pixels), -1).mean(axis=1)
        return Prediction(np.repeat(means[:, None], 10, axis=1).astype(np.float32), means.astype(np.int64), INFO)


class Observer:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.waits: list[str] = []
        self.predicted_images = 0

    def model_call(self, images: int, routes: int, seconds: float) -> None:
        self.calls.append((images, routes))

    def queued(self, route: str, seconds: float) -> None:
        self.waits.append(route)

    def predicted(self, prediction: Prediction) -> None:
        self.predicted_images += len(prediction.digits)


def images(value: int, count: int = 1) -> np.ndarray:
    return np.full((count, 28, 28), value, np.uint8)


def run(coroutine):
    return asyncio.run(coroutine)


def test_concurrent_requests_share_model_calls_and_each_gets_its_own_rows():
    model, observer = Recorder(delay_s=0.01), Observer()
    batcher = Batcher(model, max_batch_images=64, max_wait_s=5, max_queue_images=1000, observer=observer)

    async def main():
        routes = ["http_json", "tf_rest", "grpc"]
        return await asyncio.gather(*(batcher.predict(images(i, count=1 + i % 3), routes[i % 3]) for i in range(30)))

    answers = run(main())
    for i, answer in enumerate(answers):
        assert len(answer.digits) == 1 + i % 3
        assert set(answer.digits.tolist()) == {i}  # its own images, not a neighbour's
        assert answer.model == INFO
    assert len(model.calls) < 30 and sum(model.calls) == sum(1 + i % 3 for i in range(30))
    assert max(routes for _, routes in observer.calls) > 1
    assert sorted(observer.waits) == sorted(["http_json", "tf_rest", "grpc"] * 10)
    assert observer.predicted_images == sum(model.calls)  # every answered image seen once by the monitoring
    batcher.close()


def test_a_model_call_never_exceeds_the_batch_limit_but_a_large_request_is_never_split():
    model = Recorder(delay_s=0.01)
    batcher = Batcher(model, max_batch_images=8, max_wait_s=5, max_queue_images=1000)

    async def main():
        return await asyncio.gather(*(batcher.predict(images(1, 3), "a") for _ in range(10)), batcher.predict(images(2, 20), "b"))

    answers = run(main())
    assert len(answers[-1].digits) == 20
    assert all(size <= 8 for size in model.calls if size != 20) and 20 in model.calls
    batcher.close()


def test_a_full_queue_refuses_at_once_and_the_batcher_keeps_serving():
    model = Recorder(delay_s=0.05)
    batcher = Batcher(model, max_batch_images=4, max_wait_s=5, max_queue_images=10)

    async def main():
        results = await asyncio.gather(*(batcher.predict(images(1, 4), "a") for _ in range(6)), return_exceptions=True)
        after = await batcher.predict(images(3), "a")
        return results, after

    results, after = run(main())
    refused = [r for r in results if isinstance(r, Overloaded)]
    assert refused and all("limit is 10" in str(r) for r in refused)
    assert all(isinstance(r, Prediction) for r in results if not isinstance(r, Overloaded))
    assert after.digits.tolist() == [3]
    assert Overloaded.http_status == 503 and Overloaded.grpc_code == grpc.StatusCode.RESOURCE_EXHAUSTED
    batcher.close()


def test_requests_that_queue_past_the_latency_budget_are_shed_not_served_late():
    model = Recorder(delay_s=0.2)
    batcher = Batcher(model, max_batch_images=1, max_wait_s=0.05, max_queue_images=1000)

    async def main():
        return await asyncio.gather(*(batcher.predict(images(i), "a") for i in range(3)), return_exceptions=True)

    first, *rest = run(main())
    assert isinstance(first, Prediction)
    assert all(isinstance(r, Overloaded) and "budget" in str(r) for r in rest)
    assert model.calls == [1]
    batcher.close()


def test_a_failing_model_call_fails_its_requests_only():
    model = Recorder(fail=True)
    batcher = Batcher(model, max_batch_images=64, max_wait_s=5, max_queue_images=1000)

    async def main():
        failed = await asyncio.gather(batcher.predict(images(1), "a"), batcher.predict(images(2), "b"), return_exceptions=True)
        model.fail = False
        return failed, await batcher.predict(images(5), "a")

    failed, after = run(main())
    assert all(isinstance(f, RuntimeError) and not isinstance(f, ServiceError) for f in failed)
    assert after.digits.tolist() == [5]
    batcher.close()


@pytest.mark.parametrize("cancelled_first", [True, False])
def test_a_client_that_goes_away_does_not_break_the_others(cancelled_first):
    model = Recorder(delay_s=0.02)
    batcher = Batcher(model, max_batch_images=64, max_wait_s=5, max_queue_images=1000)

    async def main():
        gone = asyncio.ensure_future(batcher.predict(images(9), "a"))
        stays = asyncio.ensure_future(batcher.predict(images(4), "b"))
        if cancelled_first:
            gone.cancel()
        else:
            await asyncio.sleep(0)
            gone.cancel()
        return await stays

    assert run(main()).digits.tolist() == [4]
    batcher.close()


def test_until_idle_waits_for_queued_and_running_calls():
    """What shadow copies wait on: nothing queued and no model call running."""
    gate = threading.Event()

    def blocked(pixels: np.ndarray) -> Prediction:
        gate.wait(10)
        return Prediction(np.zeros((len(pixels), 10), np.float32), np.zeros(len(pixels), np.int64), INFO)

    batcher = Batcher(blocked, max_batch_images=64, max_wait_s=5, max_queue_images=1000)

    async def main() -> tuple[bool, bool, bool]:
        idle_before = await batcher.until_idle(0.01)
        call = asyncio.ensure_future(batcher.predict(images(1), "http_json"))
        await asyncio.sleep(0.05)
        busy = await batcher.until_idle(0.05)  # the call is still running: not idle
        gate.set()
        idle_after = await batcher.until_idle(5)
        await call
        return idle_before, busy, idle_after

    assert run(main()) == (True, False, True)
    batcher.close()
