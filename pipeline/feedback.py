"""Users' corrections (the service's ``/feedback``, ``FEEDBACK_DIR``) as training data.

    python -m pipeline feedback stats  <FEEDBACK_DIR>                       counts and online accuracy per version
    python -m pipeline feedback export <FEEDBACK_DIR> --out reviewed.npz    images and labels, to review
    python -m pipeline train --feedback reviewed.npz                        adds them to the training split

The export is the review step: a person looks at it (or prunes it) before it trains anything. Feedback
only ever joins the training split, never validation or test, so the gate still decides on the
held-out test set. The record format is ``contract.FEEDBACK_FIELDS``.
"""

from __future__ import annotations

import base64
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from contract import FEEDBACK_FILES, IMAGE_SHAPE
from pipeline.errors import DataError


def read_records(directory: Path) -> list[dict[str, Any]]:
    """Every stored record, oldest file first, ``pixels`` as uint8 ``[28, 28]``. A torn last line (the
    service stopped mid-write) is skipped."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"no feedback directory at {directory} (the service's FEEDBACK_DIR)")
    records = []
    for path in sorted(directory.glob(FEEDBACK_FILES)):
        for line in path.read_bytes().splitlines():
            try:
                record = orjson.loads(line)
                record["pixels"] = np.frombuffer(base64.b64decode(record["pixels"]), np.uint8).reshape(IMAGE_SHAPE)
                record["label"], record["predicted"] = int(record["label"]), int(record["predicted"])
            except (orjson.JSONDecodeError, KeyError, ValueError, TypeError):
                continue
            records.append(record)
    return records


def stats(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model version: how many verdicts, how many said right, the online accuracy they imply."""
    by_version: dict[str, list[bool]] = defaultdict(list)
    for record in records:
        by_version[str(record["model_version"])].append(record["predicted"] == record["label"])
    return {
        "records": len(records),
        "labels": dict(sorted(Counter(r["label"] for r in records).items())),
        "versions": {
            version: {"verdicts": len(right), "right": sum(right), "online_accuracy": round(sum(right) / len(right), 4)}
            for version, right in sorted(by_version.items())
        },
    }


def export(records: list[dict[str, Any]], out: Path) -> int:
    """``x_feedback`` (uint8 ``[N, 28, 28]``), ``y_feedback`` (the users' labels), and what each answer
    was (``predicted``, ``model_version``), for review; returns N."""
    if not records:
        raise DataError("no feedback records to export")
    np.savez_compressed(
        out,
        x_feedback=np.stack([r["pixels"] for r in records]),
        y_feedback=np.array([r["label"] for r in records], np.uint8),
        predicted=np.array([r["predicted"] for r in records], np.uint8),
        model_version=np.array([str(r["model_version"]) for r in records]),
    )
    return len(records)


def load_reviewed(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A reviewed export: (uint8 images ``[N, 28, 28]``, uint8 labels ``[N]``), checked."""
    try:
        with np.load(path) as npz:
            x, y = npz["x_feedback"], npz["y_feedback"]
    except (OSError, ValueError, KeyError) as exc:
        hint = "make one with `python -m pipeline feedback export`"
        raise DataError(f"--feedback {path}: not a feedback export ({exc}); {hint}") from None
    if x.ndim != 3 or x.shape[1:] != IMAGE_SHAPE or x.dtype != np.uint8 or len(x) != len(y):
        raise DataError(f"--feedback {path}: x_feedback must be uint8 [N, 28, 28] with one label each")
    if len(y) and (y.min() < 0 or y.max() > 9):
        raise DataError(f"--feedback {path}: labels must be digits 0-9")
    return x, y.astype(np.uint8)
