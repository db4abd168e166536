"""The Keras patches (``pipeline/keras_patches.py``), in-process: each still has its target, and the
process-wide one is applied once, whatever the number of calls."""

from __future__ import annotations

import importlib
from functools import reduce

import pytest

from pipeline import keras_patches
from pipeline.keras_patches import PATCHED


@pytest.mark.parametrize("patch", PATCHED, ids=[f"{p.module}.{p.attribute}" for p in PATCHED])
def test_every_patched_keras_attribute_still_exists(patch):
    try:
        reduce(getattr, patch.attribute.split("."), importlib.import_module(patch.module))
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"patch {patch.name!r} ({patch.written_for}): {patch.module}.{patch.attribute} is gone: {exc}")


def test_the_scalar_average_wraps_keras_once():
    trainer = importlib.import_module(keras_patches.TRAINER)
    keras_patches.average_multi_worker_scalars()
    patched = trainer.reduce_per_replica
    keras_patches.average_multi_worker_scalars()
    assert trainer.reduce_per_replica is patched and patched.multi_worker_scalars
