"""Shared fixtures: the committed MNIST sample and one real training run reused by many tests
(helpers live in ``tests/helpers.py``)."""

from __future__ import annotations

import os
import uuid

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


@pytest.fixture(scope="module")
def postgres_database() -> str:
    """A fresh PostgreSQL database on ``$TEST_POSTGRES_URL``'s server (``.ci/run`` starts one), dropped
    afterwards; skips, saying why, when no server answers."""
    psycopg = pytest.importorskip("psycopg")
    admin_url = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    try:
        admin = psycopg.connect(admin_url, connect_timeout=5, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL server at {admin_url} (set TEST_POSTGRES_URL; .ci/run starts one): {exc}".strip())
    name = f"test_{uuid.uuid4().hex[:8]}"
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = admin_url.rpartition("/")
    yield f"{base}/{name}"
    with admin.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()
