"""Shared fixtures: the committed MNIST sample and one real training run reused by many tests
(helpers live in ``tests/helpers.py``)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.helpers import SAMPLE_NPZ, TrainedRegistry, last_json_line, run_pipeline, seed_training, store_env

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def sample_npz():
    return SAMPLE_NPZ


@pytest.fixture(scope="session")
def sample() -> dict[str, np.ndarray]:
    with np.load(SAMPLE_NPZ) as npz:
        return {key: npz[key] for key in npz.files}


@pytest.fixture(scope="session")
def trained_registry(tmp_path_factory: pytest.TempPathFactory) -> TrainedRegistry:
    """Train the seed config for 1 epoch on the sample into a temporary SQLite MLflow store."""
    workdir = tmp_path_factory.mktemp("registry")
    env = store_env(workdir)
    proc = run_pipeline(
        seed_training(workdir / "exports", "training.log_every_n_steps=5", "registry.accuracy_floor=0.3"),
        env,
        workdir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return TrainedRegistry(workdir, env["MLFLOW_TRACKING_URI"], env, last_json_line(proc.stdout), proc.stdout)
