"""How this worker runs the model on its CPU: TensorFlow's thread pools and the numeric precision.

Threads. Each worker runs TensorFlow with one inter-op thread (it calls the model from one batcher at a
time, and a second pool only adds contention) and as many intra-op threads as the machine has cores,
even with several workers: one worker's model call mostly runs while the others parse JSON, and
splitting the cores (cores / workers each) was slower — measured with two workers on 2 cores
(docs/performance.md, "Threads"). ``TF_INTRA_OP_THREADS`` / ``TF_INTER_OP_THREADS`` override it. They
must be set before TensorFlow runs its first op (:func:`configure_threads`, called as a worker starts).

Precision. ``MODEL_PRECISION=fp32`` (default) runs the export as it is. ``bf16`` asks oneDNN to run it in
bfloat16 (TensorFlow's ``auto_mixed_precision_onednn_bfloat16`` graph rewrite), ``auto`` does so only
where the CPU has bfloat16 units (``avx512_bf16`` or ``amx_bf16``; elsewhere bfloat16 is emulated and
slower). Either way each model is checked when it loads: the digits of :data:`CALIBRATION` in bfloat16
must all equal fp32's and the probabilities stay within :data:`MAX_PROBABILITY_DIFF`; if not (or
without bfloat16 units) the worker runs fp32 and says why in one log line. The rewrite is a
process-wide TensorFlow option applied when a function runs, so the choice holds for every model the
worker serves until the next load decides again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

logger = logging.getLogger("digits.compute")

PRECISIONS = ("fp32", "bf16", "auto")
CALIBRATION = Path(__file__).parent / "data" / "calibration-digits.npz"
CPUINFO = Path("/proc/cpuinfo")
MAX_PROBABILITY_DIFF = 0.05  # bfloat16 keeps 3 significant digits: observed diffs are about 5e-3
BF16_OPTION = "auto_mixed_precision_onednn_bfloat16"


def usable_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a container's
    ``--cpus`` or a Kubernetes CPU limit, which affinity does not show), rounded up."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores


def thread_counts(cores: int, intra: int | None = None, inter: int | None = None) -> tuple[int, int]:
    """(intra-op, inter-op) threads for a worker on a machine with ``cores`` usable cores."""
    return intra or max(1, cores), inter or 1


def threads_from_env() -> tuple[int, int]:
    """(intra-op, inter-op) threads for a worker here, ``TF_INTRA_OP_THREADS``/``TF_INTER_OP_THREADS``
    overriding; a value that is not a whole number >= 1 is a configuration error."""
    return thread_counts(usable_cores(), _env_int("TF_INTRA_OP_THREADS"), _env_int("TF_INTER_OP_THREADS"))


def configure_threads(intra: int, inter: int) -> None:
    """Set TensorFlow's thread pools for this worker (before its first op)."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(intra)
    tf.config.threading.set_inter_op_parallelism_threads(inter)


def cpu_has_bf16(cpuinfo: Path | None = None) -> bool:
    """Whether the CPU has bfloat16 arithmetic units (AVX512_BF16 or AMX-BF16)."""
    try:
        flags = (cpuinfo or CPUINFO).read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def set_bf16(enabled: bool) -> None:
    import tensorflow as tf

    tf.config.optimizer.set_experimental_options({BF16_OPTION: enabled})


def choose_precision(
    requested: str,
    predict: Callable[[np.ndarray], np.ndarray],
    has_bf16: bool | None = None,
    tolerance: float = MAX_PROBABILITY_DIFF,
) -> tuple[str, str]:
    """(precision, reason) for a model whose ``predict`` maps uint8 pixels to probabilities; leaves
    TensorFlow's option set for the precision chosen."""
    if requested == "fp32":
        set_bf16(False)
        return "fp32", "MODEL_PRECISION=fp32"
    has_bf16 = cpu_has_bf16() if has_bf16 is None else has_bf16
    if not has_bf16:
        set_bf16(False)
        return "fp32", f"MODEL_PRECISION={requested}, but this CPU has no bfloat16 units (avx512_bf16, amx_bf16)"
    with np.load(CALIBRATION) as data:
        pixels = data["pixels"]
    set_bf16(False)
    reference = predict(pixels)
    set_bf16(True)
    reduced = predict(pixels)
    worst = float(np.abs(reduced - reference).max())
    same_digits = bool((reduced.argmax(1) == reference.argmax(1)).all())
    if not same_digits or worst > tolerance:
        set_bf16(False)
        differ = int((reduced.argmax(1) != reference.argmax(1)).sum())
        return "fp32", (
            f"MODEL_PRECISION={requested}, but bfloat16 disagrees with fp32 on the calibration digits "
            f"({differ} of {len(pixels)} digits differ, max |dp| {worst:.3g})"
        )
    return (
        "bf16",
        f"MODEL_PRECISION={requested}: bfloat16 agrees with fp32 on {len(pixels)} calibration digits (max |dp| {worst:.3g})",
    )


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise SystemExit(f"configuration error: {name} must be a whole number >= 1, not {value!r}")
    return int(value)
