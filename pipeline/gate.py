"""The gate: a candidate becomes ``champion`` only at or above the accuracy floor and the current
champion's accuracy, re-measured on the candidate's test data.

The gate is a compare-and-set: the champion is read, scored, compared and moved while holding
:func:`gate_lock`, so two trainings finishing together cannot both beat the same stale champion.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from contract import CHAMPION
from pipeline import register, tracking
from pipeline.errors import GateBusy


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    candidate_accuracy: float
    champion_accuracy: float | None
    floor: float
    reason: str


def decide(candidate_accuracy: float, champion_accuracy: float | None, floor: float) -> GateDecision:
    """Promote only at or above the floor and at or above the current champion (same test data)."""
    if candidate_accuracy < floor:
        promote, reason = False, f"test accuracy {candidate_accuracy:.4f} is below the floor {floor:.4f}"
    elif champion_accuracy is not None and candidate_accuracy < champion_accuracy:
        promote, reason = (
            False,
            (f"test accuracy {candidate_accuracy:.4f} is below the current champion's {champion_accuracy:.4f}"),
        )
    elif champion_accuracy is None:
        promote, reason = True, f"no champion yet and {candidate_accuracy:.4f} >= floor {floor:.4f}"
    else:
        promote, reason = (
            True,
            (f"test accuracy {candidate_accuracy:.4f} >= champion's {champion_accuracy:.4f} and >= floor {floor:.4f}"),
        )
    return GateDecision(promote, candidate_accuracy, champion_accuracy, floor, reason)


@dataclass(frozen=True)
class GateOutcome:
    decision: GateDecision
    previous_champion: str | None  # the champion version the decision was made against


def gate_and_promote(
    name: str,
    version: str,
    candidate_accuracy: float,
    floor: float,
    champion_accuracy: Callable[[str], float],
    before_promote: Callable[[str | None], None] = lambda _: None,
) -> GateOutcome:
    """Read the champion, score it, decide and move the alias, all under :func:`gate_lock`.

    ``champion_accuracy(version)`` scores a registered version on the candidate's test data;
    ``before_promote(previous)`` runs just before the alias moves (the job records ``previous`` in the
    run, so a crash between here and the end of the run can be undone by ``recover``).
    """
    with gate_lock(name):
        champion = register.current_champion(name)
        previous = str(champion.version) if champion is not None else None
        champion_score = champion_accuracy(previous) if previous is not None else None
        decision = decide(candidate_accuracy, champion_score, floor)
        if decision.promote:
            before_promote(previous)
            register.promote(name, version, CHAMPION)
    return GateOutcome(decision, previous)


# -- the lock ------------------------------------------------------------------------------------------

LOCK_SUFFIX = "--gate-lock"
LOCK_STALE_S = 600.0  # a holder that has not finished its gate in 10 minutes is gone


def lock_name(name: str) -> str:
    return f"{name}{LOCK_SUFFIX}"


@contextmanager
def gate_lock(name: str, wait_s: float = 900.0, poll_s: float = 0.5) -> Iterator[None]:
    """Hold the gate of registered model ``name`` for this process.

    The lock is a registered model named ``<name>--gate-lock``: creating a registered model is atomic
    in every MLflow store (a unique name in the database), works over the tracking server's REST API
    with the trainer's own credentials, and shows in the UI who holds it. A lock whose holder is gone
    is broken (:func:`break_stale_lock`); ``python -m pipeline recover`` does the same.
    """
    client, lock = MlflowClient(), lock_name(name)
    holder = f"{socket.gethostname()}:{os.getpid()}"
    started = f"{tracking.process_started(os.getpid()):.0f}"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.create_registered_model(
                lock,
                tags={"holder": holder, "process_started": started, "acquired_at": f"{time.time():.0f}"},
                description=f"held while a training run gates {name}; deleted after",
            )
            break
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        if break_stale_lock(name):
            continue
        if time.monotonic() > deadline:
            raise GateBusy(
                f"the gate of {name} is still held by another training after {wait_s:.0f}s "
                f"(registered model {lock}); retry later or run `python -m pipeline recover`"
            )
        time.sleep(poll_s)
    try:
        yield
    finally:
        client.delete_registered_model(lock)


def break_stale_lock(name: str, stale_s: float = LOCK_STALE_S) -> str | None:
    """Delete the gate lock when its holder is gone; returns its holder.

    Gone means: on this host, its process no longer runs (or its pid now belongs to another process);
    on another host, whose processes cannot be seen from here, it took the lock more than ``stale_s``
    ago (a gate takes seconds).
    """
    client = MlflowClient()
    try:
        lock = client.get_registered_model(lock_name(name))
    except MlflowException:
        return None
    host, _, pid = lock.tags.get("holder", "").rpartition(":")
    started = lock.tags.get("process_started")
    alive = tracking.process_alive(host, pid, started) if started else None  # a lock from before the tag: by age
    acquired = float(lock.tags.get("acquired_at", "0") or 0)
    if alive or (alive is None and time.time() - acquired < stale_s):
        return None
    try:
        client.delete_registered_model(lock.name)
    except MlflowException:
        return None
    return lock.tags.get("holder", "unknown")
