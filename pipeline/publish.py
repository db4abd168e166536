"""The servable directory's layout, without TensorFlow: where an export is staged, how a verified one
is put in place under its version number, and how either is taken back.

Layout: ``<base>/mnist/<version>/`` for published exports (what TensorFlow Serving and the service load)
and ``<base>/mnist/.staging-<pid>-<process start>-<random>-<host>/`` while one is written; TensorFlow
Serving ignores names that are not numbers, so a staged export is never picked up half-written. The
staging name says which process wrote it, so ``recover`` can tell a live writer's from a dead one's.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from pathlib import Path

from contract import servable_dir
from pipeline.errors import ExportError
from pipeline.tracking import process_started


def new_staging(export_base: Path) -> Path:
    """A fresh staging path under ``<base>/mnist`` (created: the servable directory, not the path)."""
    servable = servable_dir(export_base)
    servable.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    return servable / f".staging-{pid}-{process_started(pid):.0f}-{uuid.uuid4().hex[:8]}-{socket.gethostname()}"


def publish(staging: Path, version: int | str) -> Path:
    """Atomically rename a verified staging export to ``<base>/mnist/<version>``."""
    final = staging.parent / str(version)
    if final.exists():
        raise ExportError(f"export {final} already exists; refusing to overwrite it")
    staging.rename(final)
    return final


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)


def unpublish(path: Path) -> None:
    """Remove a published export again (the rollback when a later step of the commit fails)."""
    shutil.rmtree(path, ignore_errors=True)


def staging_owner(staging: Path) -> tuple[str, str, str] | None:
    """(host, pid, process start time) of the process that wrote a staging export, if its name says."""
    parts = staging.name.split("-", 4)
    if len(parts) != 5 or not parts[1].isdigit():
        return None
    return parts[4], parts[1], parts[2]
