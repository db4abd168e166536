"""What the pipeline and the service must agree on, in one place both import.

The pipeline writes a SavedModel with this signature under these names; the service finds it by the
same names and calls it with the same shapes. If one side changed a name alone, the service would
stop finding the model and no test of either half would notice: ``tests/test_contract.py`` checks a
model the pipeline exports against this module and loads it through the service's runtime.

Kept free of heavy imports (no TensorFlow, no MLflow) so the CLI and the service start fast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

IMAGE_SHAPE = (28, 28)  # one image: uint8 pixels, 0 = background, 255 = ink
NUM_CLASSES = 10  # the digits 0-9


@dataclass(frozen=True)
class Signature:
    """The exported SavedModel's signature: raw pixels in, probabilities and the digit out."""

    name: str = "serving_default"
    input: str = "pixels"  # uint8 [N, 28, 28]
    probabilities: str = "probabilities"  # float32 [N, 10]
    digit: str = "digit"  # int64 [N]

    @property
    def outputs(self) -> tuple[str, str]:
        return (self.probabilities, self.digit)


SIGNATURE = Signature()

# -- names in the registry and on disk ----------------------------------------------------------------

SERVABLE_NAME = "mnist"  # TF Serving's model name, and the export layout <base>/mnist/<version>/
REGISTERED_MODEL = "mnist-cnn"  # the MLflow registered model
EXPERIMENT = "mnist"  # the MLflow experiment training runs go to
CHAMPION = "champion"  # the alias the service follows
CHALLENGER = "challenger"  # the alias of the latest registered version
SAVED_MODEL_ARTIFACT = "saved_model"  # inside a registered MLflow model, beside the keras flavor files
TEST_ACCURACY_TAG = "test_accuracy"  # on each registered version: its test accuracy, shown by the service


def servable_dir(export_base: str | Path) -> Path:
    """``<base>/mnist``: where the numbered version directories of the exports live."""
    return Path(export_base) / SERVABLE_NAME


def registry_uri(name: str = REGISTERED_MODEL, alias: str = CHAMPION) -> str:
    """``models:/<name>@<alias>``, or ``models:/<name>/<version>`` when ``alias`` is a number."""
    return f"models:/{name}/{alias}" if str(alias).isdigit() else f"models:/{name}@{alias}"


# -- where runs and models are tracked ------------------------------------------------------------------

EMBEDDED_DB = "mlflow.db"  # the default store: a SQLite file in the working directory
EMBEDDED_ARTIFACTS = "mlartifacts"  # its artifacts, beside the database


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else the embedded SQLite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / EMBEDDED_DB}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` store URI, None for any other store."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


# -- user feedback (the drawing page's corrections): service/feedback.py writes, pipeline/feedback.py reads --

FEEDBACK_FILES = "feedback-*.jsonl"  # JSON lines under FEEDBACK_DIR, one file per service worker and day
FEEDBACK_FIELDS = ("time", "model_version", "predicted", "label", "pixels")  # pixels: base64 of 784 uint8, row-major
