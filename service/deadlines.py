"""Deadlines kept by one sweep per worker instead of a timer per request.

The service bounds how long a client may take to send its headers and its body, and how long an
answer may take to start. A timer per request is the obvious way, but on uvloop a timer is a libuv
handle made, started, stopped and closed: taking out the header and body timers saved 8-10 % of the
server's CPU per request and gave about 10 % more requests/s (champion, 2 workers, 64 connections,
measured alternating on 2 cores, docs/performance.md). Here a
request costs a dict entry; one timer per :class:`Sweeper`, running only while any deadline is
pending, expires whatever is past due. A deadline is kept to within ``tick`` (a tenth of the
timeout, at most 1 s).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable


class Sweeper:
    """Calls ``expire(key)`` once for each armed key whose deadline has passed."""

    def __init__(self, tick_s: float, expire: Callable[[Hashable], None]) -> None:
        self.tick_s = tick_s
        self._expire = expire
        self._due: dict[Hashable, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def arm(self, key: Hashable, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        self._due[key] = loop.time() + seconds
        if self._timer is None or self._loop is not loop:  # a new loop: in-process tests run several
            self._loop = loop
            self._timer = loop.call_later(self.tick_s, self._sweep)

    def disarm(self, key: Hashable) -> None:
        self._due.pop(key, None)

    def __len__(self) -> int:
        return len(self._due)

    def _sweep(self) -> None:
        now = self._loop.time()
        late = [key for key, due in self._due.items() if due <= now]
        for key in late:
            del self._due[key]
            self._expire(key)
        self._timer = self._loop.call_later(self.tick_s, self._sweep) if self._due else None


def tick_for(timeout_s: float) -> float:
    return min(1.0, timeout_s / 10)


class TaskDeadlines:
    """Cancels a task still armed ``seconds`` after :meth:`arm`; :meth:`expired` tells that
    cancellation from any other, so the task can answer (408, 504) instead of dying."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._sweeper = Sweeper(tick_for(seconds), self._cancel)
        self._cancelled: set[asyncio.Task] = set()

    def arm(self, task: asyncio.Task) -> None:
        self._sweeper.arm(task, task.get_loop(), self.seconds)

    def stop_clock(self, task: asyncio.Task) -> None:
        """The task is past what the deadline bounds (an answer has started): no cancelling from now."""
        self._sweeper.disarm(task)

    def expired(self, task: asyncio.Task) -> bool:
        """Whether the CancelledError the task caught was this deadline's; if so it is taken back
        (``uncancel``), so the task may go on to answer."""
        if task not in self._cancelled:
            return False
        self._cancelled.discard(task)
        task.uncancel()
        return True

    def disarm(self, task: asyncio.Task) -> None:
        """Done with the task, whether or not a cancellation of ours reached it (one can be pending
        when the task finished first: it is taken back)."""
        self._sweeper.disarm(task)
        self.expired(task)

    def __len__(self) -> int:
        return len(self._sweeper)

    def _cancel(self, task: Hashable) -> None:
        assert isinstance(task, asyncio.Task)
        self._cancelled.add(task)
        task.cancel()
