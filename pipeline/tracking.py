"""Where runs go: ``$MLFLOW_TRACKING_URI``, or an embedded SQLite store inside the project.

The embedded default (``sqlite:///mlflow.db`` with artifacts in ``mlartifacts/``, both git-ignored,
beside the database) is what ``mlflow ui --backend-store-uri sqlite:///mlflow.db``
shows, with no server to start.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import mlflow

EMBEDDED_DB = "mlflow.db"
EMBEDDED_ARTIFACTS = "mlartifacts"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / EMBEDDED_DB}"


def setup_uri() -> str:
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    return uri


def setup(experiment: str) -> str:
    """Point MLflow at the tracking store and select (or create) the experiment; returns its id."""
    uri = setup_uri()
    existing = mlflow.get_experiment_by_name(experiment)
    if existing is not None:
        mlflow.set_experiment(experiment_id=existing.experiment_id)
        return existing.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):  # a file store: keep artifacts beside the database
        artifact_location = (Path(uri.removeprefix("sqlite:///")).resolve().parent / EMBEDDED_ARTIFACTS).as_uri()
    experiment_id = mlflow.create_experiment(experiment, artifact_location=artifact_location)
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"
