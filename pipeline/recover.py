"""Put a tracking store back in order after a training process died (``kill -9``, OOM, node loss).

``python -m pipeline recover`` runs this; so does every ``train`` before it starts. One line per fix:

- a run left RUNNING by a process that is gone is marked FAILED. Gone means: on this host, its pid
  no longer runs (or now belongs to another process); elsewhere, no heartbeat for ``stale_after_s``
  (the job beats every 30 s; MLflow itself has no lease);
- a model version whose run did not finish is deleted, with its published export, and if it had
  become champion the alias goes back to the version the gate replaced;
- staging exports of dead processes are removed, and a gate lock left by a dead holder is broken.

Live trainings are left alone, so recover is safe to run while others train against the same store.
"""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from contract import CHAMPION, servable_dir
from pipeline import gate, publish, register, tracking

PREVIOUS_CHAMPION_TAG = "gate_previous_champion"
EXPORT_PATH_TAG = "export_path"


def recover(
    name: str, experiment: str, export_base: Path, stale_after_s: float = 600.0, say: Callable[[str], None] = print
) -> list[str]:
    client = MlflowClient()
    fixes = [
        *_fail_dead_runs(client, experiment, stale_after_s),
        *_delete_unfinished_versions(client, name, Path(export_base)),
        *_remove_dead_staging(servable_dir(export_base), stale_after_s),
    ]
    holder = gate.break_stale_lock(name)
    if holder:
        fixes.append(f"broke the gate lock of {name} left by {holder}")
    for line in fixes:
        say(f"recover: {line}")
    return fixes


def _fail_dead_runs(client: MlflowClient, experiment: str, stale_after_s: float) -> list[str]:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    fixes = []
    for run in client.search_runs([found.experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        alive = tracking.process_alive(
            tags.get(tracking.HOST_TAG, ""), tags.get(tracking.PID_TAG, ""), tags.get(tracking.STARTED_TAG, "")
        )
        beat = float(tags.get(tracking.HEARTBEAT_TAG) or run.info.start_time / 1000)
        silent_s = time.time() - beat
        if alive is False:
            why = f"its process {tags.get(tracking.PID_TAG)} on {tags.get(tracking.HOST_TAG)} is gone"
        elif alive is None and silent_s > stale_after_s:
            why = f"no heartbeat for {silent_s / 60:.0f} min"
        else:
            continue
        client.set_terminated(run.info.run_id, "FAILED")
        tracking.forget_liveness(run.info.run_id)
        fixes.append(f"run {run.info.run_id} ({run.info.run_name}) was RUNNING but {why}: marked FAILED")
    return fixes


def _delete_unfinished_versions(client: MlflowClient, name: str, export_base: Path) -> list[str]:
    fixes = []
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return []
    for version in sorted(versions, key=lambda v: int(v.version), reverse=True):
        try:
            run = client.get_run(version.run_id) if version.run_id else None
        except MlflowException:
            run = None
        status = run.info.status if run else "missing"
        if status in ("FINISHED", "RUNNING"):  # complete, or a live training still committing
            continue
        tags = run.data.tags if run else {}
        was_champion = register.alias_version(name, CHAMPION) == str(version.version)
        client.delete_model_version(name, version.version)
        fixes.append(f"deleted {name} version {version.version}: its run {version.run_id} is {status}")
        exported = export_base / tags[EXPORT_PATH_TAG] if tags.get(EXPORT_PATH_TAG) else None  # relative to the base
        if exported and exported.name == str(version.version) and exported.is_dir():
            shutil.rmtree(exported, ignore_errors=True)
            fixes.append(f"removed its export {exported}")
        if was_champion:
            previous = tags.get(PREVIOUS_CHAMPION_TAG) or None
            if previous == "none":
                previous = None
            if previous is not None and not _finished_version(client, name, previous):
                previous = None
            register.restore_champion(name, previous)
            fixes.append(
                f"{CHAMPION} back to version {previous}"
                if previous
                else f"{name} has no {CHAMPION} now (there was none before version {version.version})"
            )
    return fixes


def _finished_version(client: MlflowClient, name: str, version: str) -> bool:
    try:
        found = client.get_model_version(name, version)
        return client.get_run(found.run_id).info.status == "FINISHED"
    except MlflowException:
        return False


def _remove_dead_staging(servable_dir: Path, stale_after_s: float) -> list[str]:
    fixes = []
    if not servable_dir.is_dir():
        return fixes
    for staging in servable_dir.glob(".staging-*"):
        owner = publish.staging_owner(staging)
        if owner is not None and owner[0] == socket.gethostname():
            dead = tracking.process_alive(owner[0], owner[1], owner[2]) is False
        else:
            dead = time.time() - staging.stat().st_mtime > stale_after_s
        if dead:
            shutil.rmtree(staging, ignore_errors=True)
            fixes.append(f"removed the staging export {staging} of a process that is gone")
    return fixes
