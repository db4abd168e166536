"""Model runtime: find, load, call and hot-swap the exported SavedModel. Knows nothing of HTTP.

A loaded model is immutable; a prediction takes one reference to it and uses it for the whole batch,
so every answer comes from exactly one version. A reload loads and warms the new version beside the
old one and then swaps the reference, so no request waits for or fails on a reload.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("digits.runtime")

SIGNATURE = "serving_default"
SAVED_MODEL_DIR = "saved_model"


class ModelLoadError(RuntimeError):
    """No model could be loaded from the configured source; the message says why."""


class RegistryUnavailable(ModelLoadError):
    """The tracking server or artifact store did not answer (within the registry timeout)."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    alias: str | None
    run_id: str | None
    test_accuracy: float | None
    source: str
    path: str
    loaded_at: str

    def as_dict(self) -> dict[str, Any]:
        """What clients may see: no file paths of this worker."""
        public = {key: value for key, value in self.__dict__.items() if key != "path"}
        if "://" not in self.source and not self.source.startswith("models:/"):
            public["source"] = "local SavedModel directory"
        return public


@dataclass(frozen=True)
class LoadedModel:
    info: ModelInfo
    serve: Any  # the SavedModel's serving_default concrete function
    signature_def: Any  # tensorflow.core.protobuf.meta_graph_pb2.SignatureDef
    key: str  # what was resolved: name/version, or a local path
    _keepalive: Any = field(repr=False, default=None)  # the loaded SavedModel object owning the variables

    def predict(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 ``[N, 28, 28]`` -> (float32 probabilities ``[N, 10]``, int64 digits ``[N]``)."""
        import tensorflow as tf

        out = self.serve(pixels=tf.constant(pixels, dtype=tf.uint8))
        return out["probabilities"].numpy(), out["digit"].numpy()


@dataclass(frozen=True)
class Prediction:
    probabilities: np.ndarray
    digits: np.ndarray
    model: ModelInfo

    def rows(self, start: int, stop: int) -> "Prediction":
        """The answers for images ``start:stop`` of the batch this prediction was made for."""
        return Prediction(self.probabilities[start:stop], self.digits[start:stop], self.model)


class ModelRuntime:
    """Holds the current model and keeps it in step with ``MODEL_URI`` (alias moves, new exports)."""

    def __init__(self, model_uri: str, tracking_uri: str, poll_seconds: float = 0.0, registry_timeout_s: float = 10.0) -> None:
        self.model_uri = model_uri
        self.tracking_uri = tracking_uri
        self.poll_seconds = poll_seconds
        self._current: LoadedModel | None = None
        self._reload_lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None
        self._workdir: Path | None = None  # where registry versions are downloaded, made on first use
        self.registry_timeout_s = registry_timeout_s

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> ModelInfo:
        """Load the model now (raises :class:`ModelLoadError`) and start polling for new versions."""
        self.reload()
        if self.poll_seconds > 0:
            self._poller = threading.Thread(target=self._poll, name="model-poller", daemon=True)
            self._poller.start()
        return self.current.info

    def check(self) -> str:
        """Resolve ``MODEL_URI`` without loading it (raises :class:`ModelLoadError`); returns what it names."""
        target = self._resolve()
        return f"{target['name']} version {target['version']}"

    def stop(self) -> None:
        self._stop.set()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)

    @property
    def ready(self) -> bool:
        return self._current is not None

    @property
    def current(self) -> LoadedModel:
        model = self._current
        if model is None:
            raise ModelLoadError("no model is loaded yet")
        return model

    def predict(self, pixels: np.ndarray) -> Prediction:
        model = self.current  # one reference for the whole batch: never a mixed-version answer
        probabilities, digits = model.predict(pixels)
        return Prediction(probabilities, digits, model.info)

    def reload(self) -> tuple[ModelInfo | None, ModelInfo]:
        """Load the version ``MODEL_URI`` points at now, if it differs from the loaded one."""
        with self._reload_lock:
            old = self._current
            target = self._resolve()
            if old is not None and old.key == target["key"]:
                return old.info, old.info
            new = self._load(target)
            self._current = new
            if old is not None:
                logger.info("switched model %s version %s -> %s", new.info.name, old.info.version, new.info.version)
            else:
                logger.info("loaded model %s version %s from %s", new.info.name, new.info.version, new.info.source)
            return (old.info if old else None), new.info

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.reload()
            except Exception as exc:  # keep serving the loaded model; say why the new one was not taken
                logger.warning("model poll failed, still serving version %s: %s",
                               self._current.info.version if self._current else "none", exc)

    # -- resolving and loading -------------------------------------------------------------------

    def _resolve(self) -> dict[str, Any]:
        uri = self.model_uri
        if not uri.startswith("models:/"):
            if "://" not in uri or uri.startswith("file://"):
                return self._resolve_local(Path(uri.removeprefix("file://")))
            raise ModelLoadError(f"MODEL_URI {uri!r}: use models:/<name>@<alias>, models:/<name>/<version> or a local directory")
        _bound_registry_calls(self.registry_timeout_s)
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        if self.tracking_uri.startswith("sqlite:///") and not Path(self.tracking_uri.removeprefix("sqlite:///")).is_file():
            raise ModelLoadError(f"the tracking store {self.tracking_uri} does not exist (MLFLOW_TRACKING_URI); "
                                 "train a model first (make train) or fix the path")
        reference = uri.removeprefix("models:/").strip("/")
        client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        try:
            if "@" in reference:
                name, alias = reference.split("@", 1)
                version = client.get_model_version_by_alias(name, alias)
            else:
                name, _, number = reference.partition("/")
                alias, version = None, client.get_model_version(name, number)
        except MlflowException as exc:
            if "failed with exception" in exc.message or exc.get_http_status_code() >= 500:  # no answer, or a broken server
                raise RegistryUnavailable(f"cannot reach the MLflow tracking store {self.tracking_uri}: "
                                          f"{_first_line(exc.message)}") from None
            raise ModelLoadError(f"cannot resolve {uri} on {self.tracking_uri}: {exc.message}") from None
        except Exception as exc:
            raise RegistryUnavailable(f"cannot reach the MLflow tracking store {self.tracking_uri}: {_first_line(exc)}") from None
        run_id = version.run_id
        accuracy = None
        if version.tags.get("test_accuracy"):
            accuracy = float(version.tags["test_accuracy"])
        return {"local": False, "key": f"{name}/{version.version}", "name": name, "alias": alias, "version": str(version.version),
                "run_id": run_id, "test_accuracy": accuracy,
                "artifact_uri": f"models:/{name}/{version.version}/{SAVED_MODEL_DIR}"}

    def _resolve_local(self, path: Path) -> dict[str, Any]:
        if not path.is_dir():
            raise ModelLoadError(f"MODEL_URI {path}: no such directory")
        if (path / SAVED_MODEL_DIR / "saved_model.pb").is_file():  # a downloaded MLflow model
            path = path / SAVED_MODEL_DIR
        if not (path / "saved_model.pb").is_file():  # a TF Serving base dir: take the highest version
            versions = sorted((int(p.name), p) for p in path.iterdir() if p.name.isdigit() and (p / "saved_model.pb").is_file())
            if not versions:
                raise ModelLoadError(f"MODEL_URI {path}: no saved_model.pb here nor in numbered version directories")
            path = versions[-1][1]
        version = path.name if path.name.isdigit() else "1"
        return {"local": True, "key": str(path.resolve()), "name": "mnist-cnn", "alias": None, "version": version, "run_id": None,
                "test_accuracy": None, "path": str(path)}

    def _load(self, target: dict[str, Any]) -> LoadedModel:
        import tensorflow as tf

        if target["local"]:
            path = target["path"]
        else:
            import mlflow

            if self._workdir is None:
                self._workdir = Path(tempfile.mkdtemp(prefix="digits-models-"))
            dst = self._workdir / f"v{target['version']}-{time.monotonic_ns()}"
            try:
                mlflow.set_tracking_uri(self.tracking_uri)
                path = mlflow.artifacts.download_artifacts(target["artifact_uri"], dst_path=str(dst))
            except Exception as exc:
                shutil.rmtree(dst, ignore_errors=True)
                raise RegistryUnavailable(f"cannot download {target['artifact_uri']}: {_first_line(exc)}") from None
        try:
            saved = tf.saved_model.load(path)
            serve = saved.signatures[SIGNATURE]
            signature_def = _signature_def(path)
        except Exception as exc:
            raise ModelLoadError(f"{target['key']} is not a SavedModel with a {SIGNATURE} signature: {_first_line(exc)}") from None
        finally:
            if not target["local"]:
                # TensorFlow has read the variables into memory: the downloaded copy is not needed
                # again, and keeping one per reload would fill the temp dir until shutdown.
                shutil.rmtree(dst, ignore_errors=True)
        loaded = LoadedModel(
            ModelInfo(
                name=target["name"], version=target["version"], alias=target["alias"], run_id=target["run_id"],
                test_accuracy=target["test_accuracy"], source=target.get("artifact_uri", path), path=str(path),
                loaded_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            ),
            serve, signature_def, target["key"], saved,
        )
        loaded.predict(np.zeros((1, 28, 28), np.uint8))  # warm up before taking traffic
        return loaded


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _bound_registry_calls(timeout_s: float) -> None:
    """MLflow retries an unreachable server 7 times with exponential backoff (minutes); a service
    that cannot reach its registry should say so within ``timeout_s`` (the user's own settings win)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, int(timeout_s / 2))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def _signature_def(path: str) -> Any:
    from tensorflow.python.saved_model import loader_impl

    meta_graph = loader_impl.parse_saved_model(path).meta_graphs[0]
    return meta_graph.signature_def[SIGNATURE]
