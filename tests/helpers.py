"""Helpers shared by the tests: the committed MNIST sample, running the pipeline as a user would, and
copies of a trained store for tests that change it."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient

from contract import EMBEDDED_DB
from harness.launcher import child_env
from tests import forkserver

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
SAMPLE_NPZ = FIXTURES / "mnist-sample.npz"
PipelineProcess = subprocess.Popen | forkserver.ForkedProcess
BENTO_USER_UID = 1034  # the user BentoML's containerized service runs as: deploy/k8s runs the pods as it


def start_pipeline(
    args: list[str], env: dict[str, str], cwd: Path, log: Path | None = None, new_session: bool = False
) -> PipelineProcess:
    """Start ``python -m pipeline ...`` in a process of its own, as a user would: stdout and stderr as text
    pipes (or both into ``log``), SIGINT not ignored whatever our own caller ignores. It comes from this
    worker's fork server (``tests/forkserver.py``: the same process less 13 s of imports) unless
    ``TEST_FORKSERVER=0``."""
    if forkserver.ENABLED:
        return forkserver.shared().start(args, child_env(env), cwd, log, new_session)
    if log is None:
        return _popen(args, env, cwd, new_session, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with log.open("w") as out:
        return _popen(args, env, cwd, new_session, stdout=out, stderr=subprocess.STDOUT)


def _popen(args: list[str], env: dict[str, str], cwd: Path, new_session: bool, **output) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-u", "-m", "pipeline", *args],
        cwd=cwd,
        env=child_env(env),
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=new_session,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # whatever our own caller ignores
        **output,
    )


def run_pipeline(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m pipeline ...`` to its end (see :func:`start_pipeline`)."""
    process = start_pipeline(args, env, cwd)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return subprocess.CompletedProcess(["python", "-m", "pipeline", *args], process.returncode, stdout, stderr)


def wait_until(check: Callable[[], object], timeout: float, interval: float = 0.5) -> object:
    """Call ``check`` until it returns something truthy or ``timeout`` seconds pass; return its last value
    (the caller asserts on it, so a timeout fails with what was last seen)."""
    deadline = time.monotonic() + timeout
    while not (value := check()) and time.monotonic() < deadline:
        time.sleep(interval)
    return value


def last_json_line(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def store_env(workdir: Path) -> dict[str, str]:
    """The environment pointing the pipeline and the service at ``<workdir>/mlflow.db``."""
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{workdir / EMBEDDED_DB}"}


@dataclass
class TrainedRegistry:
    """A tracking store holding one trained, registered and promoted seed model (version 1)."""

    workdir: Path
    tracking_uri: str
    env: dict[str, str]
    result: dict
    stdout: str

    @property
    def export_path(self) -> Path:
        return Path(self.result["export_path"])

    def copy(self, destination: Path) -> TrainedRegistry:
        """A private copy (store and exports) for a test that moves aliases or adds versions: the
        session's registry stays as every other test expects it. Artifacts are shared, read-only."""
        destination.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.workdir / EMBEDDED_DB, destination / EMBEDDED_DB)
        shutil.copytree(self.workdir / "exports", destination / "exports")
        env = store_env(destination)
        result = {
            **self.result,
            "export_path": str(destination / "exports" / self.export_path.relative_to(self.workdir / "exports")),
        }
        return TrainedRegistry(destination, env["MLFLOW_TRACKING_URI"], env, result, self.stdout)


def seed_training(export_base: Path, *overrides: str, data: Path | str = SAMPLE_NPZ, epochs: int = 1) -> list[str]:
    """``train`` arguments for the notebook's ``seed`` config on the committed sample, ``epochs`` long,
    exporting under ``export_base``; each override is one ``--set key=value``."""
    args = [
        "train",
        "--config",
        "seed",
        "--data",
        str(data),
        "--set",
        f"epochs={epochs}",
        "--set",
        f"export.base_dir={export_base}",
    ]
    for override in overrides:
        args += ["--set", override]
    return args


def client_for(uri: str) -> MlflowClient:
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def assert_failed_and_nothing_registered(env: dict[str, str], exports: Path) -> None:
    client = client_for(env["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["mnist"], output_format="list")
    assert [run.info.status for run in runs] == ["FAILED"]
    assert not [key for key in runs[0].data.tags if key.startswith("job.")], "a failed run keeps no liveness tags"
    assert client.search_model_versions("name='mnist-cnn'") == []
    assert not exports.exists() or not any(exports.rglob("saved_model.pb"))


# oneDNN picks its kernels by batch size, so the same image answered in batches of different sizes
# differs in the last digits (seen: 1.1e-5); clients read the digit and a few decimals
BATCH_TOLERANCE = 1e-4


def assert_same_answers(probabilities, expected, tolerance: float = BATCH_TOLERANCE) -> None:
    """What users rely on: probabilities within ``tolerance`` and the same digit wherever the expected
    answer is not a near tie (its two best classes further apart than the tolerance allows to swap)."""
    probabilities = np.atleast_2d(np.asarray(probabilities, dtype=np.float64))
    expected = np.atleast_2d(np.asarray(expected, dtype=np.float64))
    np.testing.assert_allclose(probabilities, expected, atol=tolerance)
    best_two = np.sort(expected, axis=1)[:, -2:]
    clear = best_two[:, 1] - best_two[:, 0] > 2 * tolerance
    np.testing.assert_array_equal(probabilities.argmax(1)[clear], expected.argmax(1)[clear])
