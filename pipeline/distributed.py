"""Multi-worker training: the cluster from ``TF_CONFIG`` and TensorFlow's ``MultiWorkerMirroredStrategy``.

Every worker runs the same command (``python -m pipeline train --set training.strategy=multi_worker``)
with its own ``TF_CONFIG``, the variable Kubernetes operators and the Job in ``deploy/k8s`` set::

    {"cluster": {"worker": ["host-0:12345", "host-1:12345"]}, "task": {"type": "worker", "index": 0}}

All workers train in lockstep (gradients all-reduced each step, each worker reading its own shard of
every batch). The chief (task ``chief``, else worker 0) alone logs to MLflow, exports and registers;
the others write nothing, and wait for the chief's verdict (:func:`settle`) so that every task exits
with the run's outcome. A worker that dies stops the others' next all-reduce, so the chief's run fails
and registers nothing.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pipeline import keras_patches
from pipeline.errors import ConfigError, PipelineError

TF_CONFIG = "TF_CONFIG"


class WorkerFailed(PipelineError, RuntimeError):
    """Another task of the cluster stopped (crashed, killed, unreachable)."""


class ChiefFailed(PipelineError, RuntimeError):
    """The chief's run failed after training: nothing was registered."""


def cluster_errors() -> tuple[type[BaseException], ...]:
    """What TensorFlow raises when a collective cannot complete because another task has gone."""
    import tensorflow as tf

    return (tf.errors.UnavailableError, tf.errors.CancelledError, tf.errors.DeadlineExceededError, tf.errors.AbortedError)


def describe_failure(exc: BaseException, when: str) -> str:
    """TensorFlow's cluster error in one line: which task went, and the cause (both sit in a graph trace)."""
    text = str(exc)
    task = re.search(r"(?:reported from|remote target) /job:(\w+)(?:/replica:\d+)?/task:(\d+)", text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    causes = [line for line in lines if "unhealthy" in line or "aborted" in line]
    cause = (causes or lines or [type(exc).__name__])[0][:300]
    who = f"task {task.group(1)}:{task.group(2)}" if task else "another task"
    return f"training cluster: {who} stopped {when} ({cause})"


@dataclass(frozen=True)
class Cluster:
    task_type: str
    task_index: int
    size: int  # processes that train (chief and workers)

    has_chief: bool = False  # a 'chief' task; without one, worker 0 is the chief

    @property
    def is_chief(self) -> bool:
        return self.task_type == "chief" or (self.task_type == "worker" and self.task_index == 0 and not self.has_chief)

    @property
    def task(self) -> str:
        return f"{self.task_type}:{self.task_index}"


def cluster_from_env(environ: dict[str, str] | None = None) -> Cluster:
    """This process's place in the cluster described by ``TF_CONFIG``; a missing or malformed one is a
    :class:`ConfigError` that says what is wrong."""
    raw = (os.environ if environ is None else environ).get(TF_CONFIG, "").strip()
    if not raw:
        raise ConfigError(
            f"training.strategy=multi_worker needs {TF_CONFIG}: "
            '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": N}} in each worker\'s environment'
        )
    try:
        spec = json.loads(raw)
        cluster, task = spec["cluster"], spec["task"]
        task_type, task_index = str(task["type"]), int(task["index"])
        members = {kind: list(addresses) for kind, addresses in cluster.items()}
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ConfigError(f"{TF_CONFIG} is not a cluster spec with 'cluster' and 'task' {{type, index}}: {exc}") from None
    if task_type not in ("chief", "worker"):
        raise ConfigError(f"{TF_CONFIG} task type {task_type!r}: multi-worker training runs tasks of type 'chief' or 'worker'")
    if not 0 <= task_index < len(members.get(task_type, [])):
        raise ConfigError(f"{TF_CONFIG} task {task_type}:{task_index} is not in its cluster {members}")
    size = len(members.get("chief", [])) + len(members.get("worker", []))
    return Cluster(task_type, task_index, size, has_chief=bool(members.get("chief")))


@dataclass(frozen=True)
class Role:
    """What this process does in a training, decided once (the CLI builds it from the config and
    ``TF_CONFIG``) and passed down: alone, or one task of a multi-worker cluster. The chief (a process
    alone is its own chief) logs to MLflow, evaluates, exports and registers; the other tasks only train."""

    cluster: Cluster | None = None  # None: a process training alone

    @property
    def multi_worker(self) -> bool:
        return self.cluster is not None

    @property
    def is_chief(self) -> bool:
        return self.cluster is None or self.cluster.is_chief

    def join(self, say: Callable[[str], None]) -> None:
        """Join the cluster before TensorFlow does anything else (its rule); alone, nothing to do."""
        if self.cluster is None:
            return
        duty = "chief: logs, exports, registers" if self.is_chief else "trains only"
        say(f"multi-worker: task {self.cluster.task} of {self.cluster.size} ({duty}); waiting for the cluster")
        multi_worker_strategy()


ALONE = Role()


def role_for(strategy: str) -> Role:
    """This process's role for ``training.strategy``; ``multi_worker`` without a valid ``TF_CONFIG`` is a
    :class:`ConfigError`, before anything else happens."""
    return Role(cluster_from_env()) if strategy == "multi_worker" else ALONE


@functools.cache
def multi_worker_strategy():
    """The process's one ``MultiWorkerMirroredStrategy``, joined to the cluster. TensorFlow requires it
    before any other TensorFlow operation, so the job creates it first thing."""
    import tensorflow as tf

    keras_patches.average_multi_worker_scalars()
    return tf.distribute.MultiWorkerMirroredStrategy()


def settle(failed: bool, timeout_s: float | None = None) -> int:
    """The last collective of a run: each task says whether its part failed and waits for all the
    others. Returns how many tasks failed. The chief calls it after its commit (or failure), the other
    workers right after training, so they exit only once the run's outcome is known, with it."""
    import tensorflow as tf

    strategy = multi_worker_strategy()
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout_s)

    @tf.function
    def count() -> tf.Tensor:
        flags = strategy.run(lambda: tf.constant(1.0 if failed else 0.0))
        return strategy.extended.reduce_to("SUM", flags, destinations="/cpu:0", options=options)

    try:
        return round(float(count()) / len(strategy.extended.worker_devices))  # each of a task's replicas said it
    except cluster_errors() as exc:
        raise WorkerFailed(describe_failure(exc, "before the run's end")) from None


@contextmanager
def verdict_to_workers(enabled: bool) -> Iterator[None]:
    """On the chief, around everything after training: the workers learn whether the run succeeded.
    An error is re-raised after they are told. A worker gone by then changes nothing: the run's
    outcome is already the chief's alone."""
    if not enabled:
        yield
        return
    try:
        yield
    except BaseException:
        _tell_workers(failed=True)
        raise
    _tell_workers(failed=False)


def _tell_workers(failed: bool) -> None:
    try:
        settle(failed=failed, timeout_s=60)
    except WorkerFailed:
        pass
