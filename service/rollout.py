"""Champion and challenger side by side: which model answers a request (``CHALLENGER_MODE``).

- ``off``: the champion answers everything (a :class:`Rollout` is then the champion's core, nothing more).
- ``shadow``: the champion answers; a copy of the request goes to the challenger off the request path,
  in the champion's idle time only (a copy waits until the champion's batcher has nothing queued or
  running, at most ``shadow_wait_s``), bounded (``SHADOW_MAX_QUEUE_IMAGES``: past it, or after the wait,
  copies are dropped and counted, never an answer), and the two digits are compared. ``SHADOW_PERCENT``
  copies only that share of requests: on shared cores the challenger's calls cost the champion CPU.
- ``canary``: ``CANARY_PERCENT`` of requests are answered by the challenger; with an ``X-Canary-Key``
  header (or gRPC metadata ``x-canary-key``) the choice is sticky per key.

Each model has its own :class:`ServingCore`, so its own batch queue: a challenger call never holds up a
champion answer. A request pinned to a version goes to whichever model serves it. Knows nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import logging
import random
from typing import Protocol

import numpy as np

from service.core import ServingCore
from service.errors import NotFound
from service.runtime import LoadedModel, Prediction

logger = logging.getLogger("digits.rollout")
MODES = ("off", "shadow", "canary")
# the caller's sticky key for canary choices, set by the HTTP and gRPC fronts for the request at hand
CANARY_KEY: contextvars.ContextVar[str | None] = contextvars.ContextVar("canary_key", default=None)


class ShadowObserver(Protocol):
    def compared(self, champion_digits: np.ndarray, challenger_digits: np.ndarray) -> None: ...

    def dropped(self, images: int) -> None: ...


def canary_share(key: str) -> float:
    """Where ``key`` falls in [0, 100): the same key always lands in the same place, on every replica."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % 10_000 / 100


class Rollout:
    """What every route calls: :meth:`predict` and :meth:`model`, as a :class:`ServingCore` offers them."""

    def __init__(
        self,
        champion: ServingCore,
        challenger: ServingCore | None = None,
        mode: str = "off",
        canary_percent: float = 10.0,
        shadow_max_images: int = 256,
        observer: ShadowObserver | None = None,
        shadow_wait_s: float = 1.0,
        shadow_percent: float = 100.0,
        rng: random.Random | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"CHALLENGER_MODE={mode!r} is not one of {', '.join(MODES)}")
        self.champion, self.challenger = champion, challenger if mode != "off" else None
        self.mode = mode if challenger is not None else "off"
        self.canary_percent = canary_percent
        self.shadow_max_images = shadow_max_images
        self.shadow_wait_s = shadow_wait_s
        self.shadow_percent = shadow_percent
        self.observer = observer
        self.runtime = champion.runtime  # readiness, /model and /admin/reload are the champion's
        self._rng = rng or random.Random()
        self._shadow_images = 0
        self._shadow_tasks: set[asyncio.Task] = set()

    def _challenger_ready(self) -> bool:
        return self.challenger is not None and self.challenger.runtime.ready

    def model(self, version: str | None = None) -> LoadedModel:
        """The champion, or with ``version`` whichever model serves it (:class:`NotFound` if neither)."""
        if version is not None and self._challenger_ready() and self.challenger.runtime.current.info.version == version:
            return self.challenger.runtime.current
        return self.champion.model(version)

    async def predict(self, pixels: np.ndarray, route: str, version: str | None = None) -> Prediction:
        if version is not None:
            return await self._core_for(version).predict(pixels, route, version)
        if self.mode == "canary" and self._challenger_ready() and self._to_challenger():
            return await self.challenger.predict(pixels, route)
        prediction = await self.champion.predict(pixels, route)
        if self.mode == "shadow" and self._challenger_ready() and self._rng.random() * 100 < self.shadow_percent:
            self._shadow(pixels, prediction)
        return prediction

    def _core_for(self, version: str) -> ServingCore:
        if self._challenger_ready() and self.challenger.runtime.current.info.version == version:
            return self.challenger
        if self.champion.runtime.ready and self.champion.runtime.current.info.version != version:
            raise NotFound(f"version {version} is not served; this server serves version {self.champion.model().info.version}")
        return self.champion

    def _to_challenger(self) -> bool:
        key = CANARY_KEY.get()
        share = canary_share(key) if key else self._rng.random() * 100
        return share < self.canary_percent

    def _shadow(self, pixels: np.ndarray, champion: Prediction) -> None:
        if self._shadow_images + len(pixels) > self.shadow_max_images:
            if self.observer:
                self.observer.dropped(len(pixels))
            return
        self._shadow_images += len(pixels)
        task = asyncio.get_running_loop().create_task(self._compare(pixels, champion))
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _compare(self, pixels: np.ndarray, champion: Prediction) -> None:
        try:
            # only in the champion's idle time: under load the copies wait, then are dropped (counted)
            if not await self.champion.batcher.until_idle(self.shadow_wait_s):
                if self.observer:
                    self.observer.dropped(len(pixels))
                return
            shadow = await self.challenger.predict(pixels, "shadow")
            if self.observer:
                self.observer.compared(champion.digits, shadow.digits)
        except Exception as exc:  # the challenger's failure is never the client's
            logger.warning("shadow call to the challenger failed: %s", exc)
            if self.observer:
                self.observer.dropped(len(pixels))
        finally:
            self._shadow_images -= len(pixels)

    def close(self) -> None:
        for task in self._shadow_tasks:
            task.cancel()
        self.champion.close()
        if self.challenger is not None:
            self.challenger.close()
