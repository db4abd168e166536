"""Import TensorFlow without the start-up noise a newcomer reads as failures (the pipeline's CLI and the
service both start with :func:`import_tensorflow`).

On a machine without a GPU, importing TensorFlow prints "Could not find cuda drivers" twice (each after
an absl banner) and its first device query a ``failed call to cuInit`` line marked E (error). They
come from native code writing to file descriptor 2 before TensorFlow's own log level applies, so the
only way to hide them is to point that descriptor at /dev/null for the import and the device query.
TensorFlow's later logging stays at warnings and above (``TF_CPP_MIN_LOG_LEVEL=1`` unless set).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def native_stderr_to_devnull() -> Iterator[None]:
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_tensorflow() -> None:
    """Import TensorFlow and probe its devices once, quietly; a real import error still raises."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    with native_stderr_to_devnull():
        import tensorflow as tf

        tf.config.list_physical_devices()
