"""Where runs go (``contract.tracking_uri``: ``$MLFLOW_TRACKING_URI``, else an embedded SQLite store),
and which runs are still alive.

The embedded default (``sqlite:///mlflow.db`` with artifacts in ``mlartifacts/``, both git-ignored,
beside the database) is what ``make ui`` (``mlflow ui --backend-store-uri sqlite:///mlflow.db``)
shows, with no server to start.
"""

from __future__ import annotations

import fcntl
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from contract import EMBEDDED_ARTIFACTS, sqlite_path, tracking_uri
from pipeline.errors import StoreMissing


def setup_uri() -> str:
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    return uri


def require_existing_store() -> str:
    """For commands that only read or fix a store (evaluate, promote, recover): never create one."""
    uri = setup_uri()
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise StoreMissing(
            f"the tracking store {path} does not exist (MLFLOW_TRACKING_URI={uri}); check the path, or train first to create it"
        )
    return uri


def setup(experiment: str, say: Callable[[str], None] = print, attempts: int = 5) -> str:
    """Point MLflow at the tracking store and select (or create) the experiment; returns its id.

    Two first runs on a new SQLite store take turns (a file lock beside it) to create its tables
    and the experiment; on a server store the loser of the race retries.
    """
    uri = setup_uri()
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        say(f"tracking store {path} does not exist yet: creating it")
    with _first_contact_lock(path):
        for attempt in range(attempts):
            try:
                return _select_experiment(uri, experiment)
            except Exception:  # a concurrent creator of the same experiment (on a server store)
                if attempt == attempts - 1:
                    raise
                time.sleep(0.5 + attempt)
    raise AssertionError("unreachable")


@contextmanager
def _first_contact_lock(path: Path | None) -> Iterator[None]:
    """Serialise processes opening one SQLite store: MLflow migrates a new store's schema on first
    contact, and two processes migrating at once can leave it half-migrated for good."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


EXPERIMENT_TAGS = {
    # without it MLflow 3's UI opens the experiment in its GenAI mode and calls training runs "Evaluations"
    "mlflow.experimentKind": "custom_model_development",
    "mlflow.note.content": (
        "Training runs of the digit classifier (`python -m pipeline train`) and hyperparameter searches "
        "(`python -m pipeline tune`, parent runs with their trials nested). Each training run's description "
        "says what came of it: its test accuracy, the registered version and the gate's decision."
    ),
}


def _select_experiment(uri: str, experiment: str) -> str:
    existing = mlflow.get_experiment_by_name(experiment)
    if existing is not None:
        mlflow.set_experiment(experiment_id=existing.experiment_id)
        if any(existing.tags.get(key) != value for key, value in EXPERIMENT_TAGS.items()):
            mlflow.set_experiment_tags(EXPERIMENT_TAGS)
        return existing.experiment_id
    artifact_location = None
    path = sqlite_path(uri)
    if path is not None:  # a file store: keep artifacts beside the database
        artifact_location = (path.resolve().parent / EMBEDDED_ARTIFACTS).as_uri()
    experiment_id = mlflow.create_experiment(experiment, artifact_location=artifact_location, tags=EXPERIMENT_TAGS)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


# -- telling live runs from runs whose process died --------------------------------------------------

HOST_TAG, PID_TAG, STARTED_TAG, HEARTBEAT_TAG = "job.host", "job.pid", "job.process_started", "job.heartbeat"
HEARTBEAT_S = 30.0


def liveness_tags() -> dict[str, str]:
    """Who runs this run: ``recover`` marks a RUNNING run FAILED when this process is gone."""
    return {
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(os.getpid()),
        STARTED_TAG: f"{process_started(os.getpid()):.0f}",
        HEARTBEAT_TAG: f"{time.time():.0f}",
    }


def forget_liveness(run_id: str) -> None:
    """Drop the liveness tags of a run that has ended: they only matter while it is RUNNING, and a
    reviewer reading a finished run's tags should not have to read past host, pid and heartbeat."""
    client = MlflowClient()
    for key in (HOST_TAG, PID_TAG, STARTED_TAG, HEARTBEAT_TAG):
        try:
            client.delete_tag(run_id, key)
        except (MlflowException, OSError):
            pass  # cosmetic: a finished run with its liveness tags left is still right


def process_started(pid: int) -> float:
    import psutil

    return psutil.Process(pid).create_time()


def process_alive(host: str, pid: str, started: str) -> bool | None:
    """Whether the process that tagged a run still runs: None when it ran on another host."""
    if host != socket.gethostname() or not pid.isdigit():
        return None
    import psutil

    try:
        return abs(process_started(int(pid)) - float(started or 0)) < 2  # the same process, not a reused pid
    except (psutil.Error, ValueError):
        return False


class Heartbeat:
    """Refreshes the run's heartbeat tag every :data:`HEARTBEAT_S` seconds while the job runs."""

    def __init__(self, run_id: str, interval_s: float = HEARTBEAT_S) -> None:
        self.run_id, self.interval_s = run_id, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="mlflow-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)  # no beat may land after the run ends

    def _beat(self) -> None:
        client = MlflowClient()
        while not self._stop.wait(self.interval_s):
            try:
                client.set_tag(self.run_id, HEARTBEAT_TAG, f"{time.time():.0f}")
            except (MlflowException, OSError):
                pass  # a missed beat only makes the run look older; the next one catches up
