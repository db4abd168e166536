"""Corrections from users (the drawing page's "right" / "it was a _"), kept durably for review and training.

Append-only JSON lines under ``FEEDBACK_DIR``, one file per worker process and day
(``feedback-<YYYYMMDD>-<pid>.jsonl``), each record written whole with ``O_APPEND`` and ``fsync``:
the 28x28 image the model saw (base64 of 784 uint8 pixels), the predicted digit, the user's label, the
model version and the time. Nothing about the client is stored. Bounded: at most ``max_bytes`` in the
directory (then 507, nothing written) and ``per_minute`` records per client address per worker (then
429). ``python -m pipeline feedback stats|export`` reads the same files (format: ``contract.FEEDBACK_FIELDS``).
Knows nothing of HTTP.
"""

from __future__ import annotations

import base64
import os
import threading
import time
from collections import defaultdict, deque
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from contract import FEEDBACK_FILES, IMAGE_SHAPE, NUM_CLASSES
from service.errors import InputError, ServiceError
from service.inputs import checked_pixels


class TooManyFeedbacks(ServiceError):
    http_status = 429


class FeedbackStoreFull(ServiceError):
    http_status = 507


def parse_feedback(value: Any) -> tuple[np.ndarray, int, int, str]:
    """``{"pixels": 28x28 (what /predict_image answered), "predicted": d, "label": d, "model_version": v}``."""
    if not isinstance(value, dict):
        raise InputError('feedback must be a JSON object with "pixels", "predicted", "label" and "model_version"')
    missing = [name for name in ("pixels", "predicted", "label", "model_version") if name not in value]
    if missing:
        raise InputError(f"feedback is missing {', '.join(missing)}")
    for name in ("predicted", "label"):
        digit = value[name]
        if not isinstance(digit, int) or isinstance(digit, bool) or not 0 <= digit < NUM_CLASSES:
            raise InputError(f"{name} must be a digit 0-9, not {digit!r}")
    version = value["model_version"]
    if not isinstance(version, str) or not version or len(version) > 64:
        raise InputError("model_version must be the version string the prediction came with")
    try:
        pixels = np.asarray(value["pixels"])
    except ValueError:
        raise InputError("pixels is ragged: send the 28 rows of 28 values the prediction answered with") from None
    if pixels.shape != IMAGE_SHAPE or pixels.dtype.kind not in "iuf":
        raise InputError(f"pixels must be 28 rows of 28 numbers 0-255 (got shape {list(pixels.shape)})")
    return checked_pixels(pixels[None], 1, "pixels")[0], value["predicted"], value["label"], version


class FeedbackStore:
    def __init__(self, directory: Path, max_bytes: int = 256 * 1024 * 1024, per_minute: int = 30) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        if not os.access(self.directory, os.W_OK):
            raise PermissionError(f"FEEDBACK_DIR {self.directory} is not writable by this process (uid {os.getuid()})")
        self.max_bytes, self.per_minute = max_bytes, per_minute
        self._lock = threading.Lock()
        self._recent: dict[str, deque[float]] = defaultdict(deque)

    def used_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.directory.glob(FEEDBACK_FILES))

    def add(self, client: str, pixels: np.ndarray, predicted: int, label: int, version: str) -> None:
        """Store one record durably, or raise :class:`TooManyFeedbacks` / :class:`FeedbackStoreFull`."""
        now = time.time()
        record = (
            orjson.dumps(
                {
                    "time": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
                    "model_version": version,
                    "predicted": predicted,
                    "label": label,
                    "pixels": base64.b64encode(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()).decode(),
                }
            )
            + b"\n"
        )
        with self._lock:
            recent = self._recent[client]
            while recent and recent[0] <= now - 60:
                recent.popleft()
            if len(recent) >= self.per_minute:
                raise TooManyFeedbacks(f"at most {self.per_minute} feedbacks a minute per client; thank you, and try later")
            if self.used_bytes() + len(record) > self.max_bytes:
                raise FeedbackStoreFull(f"the feedback store is full ({self.max_bytes} bytes, FEEDBACK_MAX_BYTES)")
            path = self.directory / f"feedback-{datetime.fromtimestamp(now, UTC):%Y%m%d}-{os.getpid()}.jsonl"
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                os.write(descriptor, record)
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
            recent.append(now)
