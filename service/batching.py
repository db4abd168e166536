"""Greedy micro-batching for every route: one queue, one model call at a time, as many images per
call as have arrived while the previous call ran. Knows nothing of HTTP or gRPC.

Why greedy and not a timed window: a lone request goes to the model at once (no added wait at low
load), and under load the queue fills while a call runs, so batches grow with the load by themselves.
The only budget is how long a request may queue: past ``max_wait_s`` it is answered
:class:`~service.errors.Overloaded` instead of being served late, and a queue over
``max_queue_images`` refuses new work at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from service.errors import Overloaded
from service.runtime import Prediction


class BatchObserver(Protocol):
    def model_call(self, images: int, routes: int, seconds: float) -> None: ...

    def queued(self, route: str, seconds: float) -> None: ...

    def predicted(self, prediction: Prediction) -> None: ...


@dataclass(eq=False)
class _Waiting:
    pixels: np.ndarray
    route: str
    future: asyncio.Future
    since: float


class Batcher:
    def __init__(
        self,
        predict: Callable[[np.ndarray], Prediction],
        *,
        max_batch_images: int,
        max_wait_s: float,
        max_queue_images: int,
        observer: BatchObserver | None = None,
    ) -> None:
        self._predict = predict
        self.max_batch_images = max_batch_images
        self.max_wait_s = max_wait_s
        self.max_queue_images = max_queue_images
        self._observer = observer
        self._queue: deque[_Waiting] = deque()
        self._queued_images = 0
        self._drainer: asyncio.Task | None = None
        self._idle_waiters: list[asyncio.Future] = []
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-call")

    async def predict(self, pixels: np.ndarray, route: str) -> Prediction:
        """Predictions for ``pixels`` (uint8 ``[N, 28, 28]``), computed in a model call that may hold
        other requests' images too; all from one model version."""
        if self._queued_images + len(pixels) > self.max_queue_images:
            raise Overloaded(
                f"the batch queue holds {self._queued_images} images, its limit is {self.max_queue_images}; retry with backoff"
            )
        loop = asyncio.get_running_loop()
        waiting = _Waiting(pixels, route, loop.create_future(), time.perf_counter())
        self._queue.append(waiting)
        self._queued_images += len(pixels)
        if self._drainer is None:
            self._drainer = loop.create_task(self._drain())
        return await waiting.future

    async def until_idle(self, timeout_s: float) -> bool:
        """Wait until nothing is queued or in a model call (True), or ``timeout_s`` passes (False): for
        work that must only use this batcher's idle time (shadow copies to a challenger)."""
        if self._drainer is None:
            return True
        idle = asyncio.get_running_loop().create_future()
        self._idle_waiters.append(idle)
        try:
            await asyncio.wait_for(idle, timeout_s)
            return True
        except TimeoutError:
            return False
        finally:
            if idle in self._idle_waiters:
                self._idle_waiters.remove(idle)

    def close(self) -> None:
        self._model_thread.shutdown(wait=False, cancel_futures=True)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                batch = self._next_batch()
                if not batch:
                    continue
                pixels = batch[0].pixels if len(batch) == 1 else np.concatenate([w.pixels for w in batch])
                started = time.perf_counter()
                try:
                    prediction = await loop.run_in_executor(self._model_thread, self._predict, pixels)
                except Exception as exc:  # the model failed: every request in the call gets the error
                    for waiting in batch:
                        if not waiting.future.done():
                            waiting.future.set_exception(exc)
                    continue
                if self._observer:
                    self._observer.model_call(len(pixels), len({w.route for w in batch}), time.perf_counter() - started)
                    self._observer.predicted(prediction)
                start = 0
                for waiting in batch:
                    stop = start + len(waiting.pixels)
                    if not waiting.future.done():  # a client that went away has a cancelled future
                        waiting.future.set_result(prediction.rows(start, stop))
                    start = stop
        finally:
            self._drainer = None
            waiters, self._idle_waiters = self._idle_waiters, []
            for idle in waiters:
                if not idle.done():
                    idle.set_result(None)

    def _next_batch(self) -> list[_Waiting]:
        batch: list[_Waiting] = []
        images = 0
        now = time.perf_counter()
        while self._queue and (not batch or images + len(self._queue[0].pixels) <= self.max_batch_images):
            waiting = self._queue.popleft()
            self._queued_images -= len(waiting.pixels)
            if waiting.future.done():
                continue
            waited = now - waiting.since
            if waited > self.max_wait_s:
                waiting.future.set_exception(
                    Overloaded(
                        f"the request queued {waited * 1000:.0f} ms, over the {self.max_wait_s * 1000:.0f} ms "
                        "budget (BATCH_MAX_LATENCY_MS); retry with backoff"
                    )
                )
                continue
            if self._observer:
                self._observer.queued(waiting.route, waited)
            batch.append(waiting)
            images += len(waiting.pixels)
        return batch
