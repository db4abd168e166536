"""Shared fixtures: the committed MNIST sample, free ports, and one real training run reused by many tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from service.launcher import child_env

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
SAMPLE_NPZ = FIXTURES / "mnist-sample.npz"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def sample_npz() -> Path:
    return SAMPLE_NPZ


@pytest.fixture(scope="session")
def sample() -> dict[str, np.ndarray]:
    with np.load(SAMPLE_NPZ) as npz:
        return {key: npz[key] for key in npz.files}


def run_pipeline(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m pipeline ...`` as a user would, in its own process."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd, env=child_env(env),
        capture_output=True, text=True, timeout=timeout,
    )


def last_json_line(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


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


@pytest.fixture(scope="session")
def trained_registry(tmp_path_factory: pytest.TempPathFactory) -> TrainedRegistry:
    """Train the seed config for 1 epoch on the sample into a temporary SQLite MLflow store."""
    workdir = tmp_path_factory.mktemp("registry")
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": tracking_uri}
    proc = run_pipeline(
        ["train", "--config", "seed", "--data", str(SAMPLE_NPZ), "--set", "epochs=1",
         "--set", "registry.accuracy_floor=0.3", "--set", f"export.base_dir={workdir / 'exports'}"],
        env, workdir,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return TrainedRegistry(workdir, tracking_uri, env, last_json_line(proc.stdout), proc.stdout)
