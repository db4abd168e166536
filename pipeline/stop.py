"""How the training job treats SIGINT and SIGTERM (what Ctrl-C, ``docker compose stop``, Kubernetes and
CronJob deadlines send): both the same way, and never in the middle of the commit.

- Outside the commit, a signal raises :class:`Stopped` (a :class:`KeyboardInterrupt`): the run is marked FAILED and
  nothing is registered. (During ``fit``, :class:`pipeline.train.StopOnSignal` lets the current batch
  finish first.)
- Inside :meth:`StopSignals.deferred` — registering, publishing the export, the gate, finishing the
  run — a signal is only recorded. The commit completes (or rolls back on an error), so a stop leaves
  either the whole result or none of it; the job then reports that the stop came too late to undo it.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """A stop signal turned into an exception; it carries the signal, so the CLI exits ``128 + signum``
    as a shell reports a process killed by that signal."""

    def __init__(self, signum: int, what: str = "stopped") -> None:
        self.signum = signum
        super().__init__(f"{what} by {signal.Signals(signum).name}")


def exit_status(exc: KeyboardInterrupt) -> int:
    """``128 + signum`` for a :class:`Stopped`; 130 (SIGINT) for Python's own KeyboardInterrupt."""
    return 128 + (exc.signum if isinstance(exc, Stopped) else signal.SIGINT)


class StopSignals:
    def __init__(self) -> None:
        self.received: str | None = None  # the name of a signal recorded while deferred
        self._deferring = False

    def install(self) -> StopSignals:
        for sig in SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: object) -> None:
        if self._deferring:
            self.received = self.received or signal.Signals(signum).name
            return
        raise Stopped(signum)

    @contextmanager
    def deferred(self, keep: bool = False) -> Iterator[None]:
        """Record SIGINT/SIGTERM instead of raising until the block ends — and after it, with ``keep``
        (once the commit is done, whatever arrives is too late to change the result)."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = keep
