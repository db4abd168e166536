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
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from contract import IMAGE_SHAPE, REGISTERED_MODEL, SAVED_MODEL_ARTIFACT, SIGNATURE, TEST_ACCURACY_TAG, sqlite_path
from service.compute import choose_precision

logger = logging.getLogger("digits.runtime")


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
    precision: str = "fp32"  # what this worker runs it in (service.compute)

    def as_dict(self) -> dict[str, Any]:
        """What clients may see: no file paths of this worker."""
        public = {key: value for key, value in self.__dict__.items() if key != "path"}
        if "://" not in self.source and not self.source.startswith("models:/"):
            public["source"] = "local SavedModel directory"
        return public


@dataclass(frozen=True)
class LoadedModel:
    info: ModelInfo
    serve: Any  # the SavedModel's signature function (contract.SIGNATURE)
    signature_defs: dict[str, Any]  # name -> tensorflow.core.protobuf.meta_graph_pb2.SignatureDef, as saved
    key: str  # what was resolved: name/version, or a local path
    _keepalive: Any = field(repr=False, default=None)  # the loaded SavedModel object owning the variables

    def predict(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 ``[N, 28, 28]`` -> (float32 probabilities ``[N, 10]``, int64 digits ``[N]``)."""
        import tensorflow as tf

        out = self.serve(**{SIGNATURE.input: tf.constant(pixels, dtype=tf.uint8)})
        return out[SIGNATURE.probabilities].numpy(), out[SIGNATURE.digit].numpy()


@dataclass(frozen=True)
class Prediction:
    probabilities: np.ndarray
    digits: np.ndarray
    model: ModelInfo

    def rows(self, start: int, stop: int) -> Prediction:
        """The answers for images ``start:stop`` of the batch this prediction was made for."""
        return Prediction(self.probabilities[start:stop], self.digits[start:stop], self.model)


class ModelRuntime:
    """Holds the current model and keeps it in step with ``MODEL_URI`` (alias moves, new exports)."""

    def __init__(
        self,
        model_uri: str,
        tracking_uri: str,
        poll_seconds: float = 0.0,
        registry_timeout_s: float = 10.0,
        on_switch: Callable[[ModelInfo | None, ModelInfo], None] | None = None,
        precision: str = "fp32",
        warmup_batch_sizes: int = 1,
    ) -> None:
        """``on_switch(old, new)`` is told of every model taken into service (``old`` is None at first);
        ``precision`` is ``MODEL_PRECISION`` (fp32, bf16 or auto: :mod:`service.compute`);
        ``warmup_batch_sizes`` is ``WARMUP_BATCH_SIZES`` (:meth:`_warm_up`)."""
        self.model_uri = model_uri
        self.warmup_batch_sizes = max(1, warmup_batch_sizes)
        self.precision = precision
        self.precision_reason = "MODEL_PRECISION=fp32"
        self.on_switch = on_switch
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
        self.start_polling()
        return self.current.info

    def start_polling(self) -> None:
        """Poll for new versions (every ``poll_seconds``; never when it is 0), whether or not one is loaded."""
        if self.poll_seconds > 0 and self._poller is None:
            self._poller = threading.Thread(target=self._poll, name="model-poller", daemon=True)
            self._poller.start()

    def check(self) -> str:
        """Resolve ``MODEL_URI`` without loading it (raises :class:`ModelLoadError`); returns what it names."""
        source = self._resolve()
        return f"{source.name} version {source.version}"

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
            source = self._resolve()
            if old is not None and old.key == source.key:
                return old.info, old.info
            new = self._load(source)
            self._current = new
            if old is not None:
                logger.info("switched model %s version %s -> %s", new.info.name, old.info.version, new.info.version)
            else:
                logger.info("loaded model %s version %s from %s", new.info.name, new.info.version, new.info.source)
            if self.on_switch is not None:
                self.on_switch(old.info if old else None, new.info)
            return (old.info if old else None), new.info

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.reload()
            except Exception as exc:  # keep serving the loaded model; say why the new one was not taken
                logger.warning(
                    "model poll failed, still serving version %s: %s",
                    self._current.info.version if self._current else "none",
                    exc,
                )

    # -- resolving and loading -------------------------------------------------------------------

    def _resolve(self) -> ModelSource:
        uri = self.model_uri
        if not uri.startswith("models:/"):
            if "://" not in uri or uri.startswith("file://"):
                return resolve_local(Path(uri.removeprefix("file://")))
            raise ModelLoadError(f"MODEL_URI {uri!r}: use models:/<name>@<alias>, models:/<name>/<version> or a local directory")
        _bound_registry_calls(self.registry_timeout_s)
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        store = sqlite_path(self.tracking_uri)
        if store is not None and not store.is_file():
            raise ModelLoadError(
                f"the tracking store {self.tracking_uri} does not exist (MLFLOW_TRACKING_URI); "
                "train a model first (make train) or fix the path"
            )
        name, alias, number = parse_registry_uri(uri)
        client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        try:
            version = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
        except MlflowException as exc:
            if "failed with exception" in exc.message or exc.get_http_status_code() >= 500:  # no answer, or a broken server
                raise RegistryUnavailable(
                    f"cannot reach the MLflow tracking store {self.tracking_uri}: {_first_line(exc.message)}"
                ) from None
            raise ModelLoadError(f"cannot resolve {uri} on {self.tracking_uri}: {exc.message}") from None
        except Exception as exc:
            raise RegistryUnavailable(f"cannot reach the MLflow tracking store {self.tracking_uri}: {_first_line(exc)}") from None
        accuracy = version.tags.get(TEST_ACCURACY_TAG)
        return ModelSource(
            name=name,
            version=str(version.version),
            alias=alias,
            run_id=version.run_id,
            test_accuracy=float(accuracy) if accuracy else None,
            location=f"models:/{name}/{version.version}/{SAVED_MODEL_ARTIFACT}",
        )

    def _load(self, source: ModelSource) -> LoadedModel:
        import tensorflow as tf

        if source.is_local:
            path = source.location
        else:
            import mlflow

            if self._workdir is None:
                self._workdir = Path(tempfile.mkdtemp(prefix="digits-models-"))
            dst = self._workdir / f"v{source.version}-{time.monotonic_ns()}"
            try:
                # Where the version's files are, then those files: MLflow 3.17 resolves a models:/ URI
                # against the process-wide registry whatever registry_uri it is given, so the models:/ URI
                # itself is only what clients see.
                client = mlflow.MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
                files = client.get_model_version_download_uri(source.name, source.version)
                path = mlflow.artifacts.download_artifacts(
                    f"{files.rstrip('/')}/{SAVED_MODEL_ARTIFACT}", dst_path=str(dst), tracking_uri=self.tracking_uri
                )
            except Exception as exc:
                shutil.rmtree(dst, ignore_errors=True)
                raise RegistryUnavailable(f"cannot download {source.location}: {_first_line(exc)}") from None
        try:
            saved = tf.saved_model.load(path)
            serve = saved.signatures[SIGNATURE.name]
            signature_defs = _signature_defs(path)
        except Exception as exc:
            raise ModelLoadError(
                f"{source.key} is not a SavedModel with a {SIGNATURE.name} signature: {_first_line(exc)}"
            ) from None
        finally:
            if not source.is_local:
                # TensorFlow has read the variables into memory: the downloaded copy is not needed
                # again, and keeping one per reload would fill the temp dir until shutdown.
                shutil.rmtree(dst, ignore_errors=True)
        info = ModelInfo(
            name=source.name,
            version=source.version,
            alias=source.alias,
            run_id=source.run_id,
            test_accuracy=source.test_accuracy,
            source=source.location,
            path=str(path),
            loaded_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        loaded = LoadedModel(info, serve, signature_defs, source.key, saved)
        precision, self.precision_reason = choose_precision(self.precision, lambda pixels: loaded.predict(pixels)[0])
        if precision != "bf16" and self.precision != "fp32":
            logger.warning("version %s runs in fp32: %s", source.version, self.precision_reason)
        elif precision == "bf16":
            logger.info("version %s runs in bfloat16: %s", source.version, self.precision_reason)
        loaded = LoadedModel(replace(info, precision=precision), serve, signature_defs, source.key, saved)
        self._warm_up(loaded)
        return loaded

    def _warm_up(self, loaded: LoadedModel) -> None:
        """Call the model once at each batch size 1..``warmup_batch_sizes`` before it takes traffic.

        oneDNN builds its kernels for each input shape on first sight: measured on the champion's
        architecture, a batch size's first call took 9-126 ms against 2-3 ms for the next one, and under
        load the batcher meets dozens of sizes within the first seconds (a p99 of 0.4-2.8 s in the first
        10 s after a start, then 30-50 ms). Warming 64 sizes takes under a second per load."""
        for size in range(1, self.warmup_batch_sizes + 1):
            loaded.predict(np.zeros((size, *IMAGE_SHAPE), np.uint8))


@dataclass(frozen=True)
class ModelSource:
    """What ``MODEL_URI`` names right now: a registry version (``location`` is its SavedModel's
    ``models:/`` URI) or a SavedModel directory on disk (``location`` is its path)."""

    name: str
    version: str
    location: str
    alias: str | None = None
    run_id: str | None = None
    test_accuracy: float | None = None

    @property
    def is_local(self) -> bool:
        return not self.location.startswith("models:/")

    @property
    def key(self) -> str:
        """Equal keys, same model: a reload that finds the same key keeps the loaded one."""
        return str(Path(self.location).resolve()) if self.is_local else f"{self.name}/{self.version}"


def parse_registry_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name@alias`` -> (name, alias, None); ``models:/name/3`` -> (name, None, "3")."""
    reference = uri.removeprefix("models:/").strip("/")
    if "@" in reference:
        name, alias = reference.split("@", 1)
        if name and alias:
            return name, alias, None
    else:
        name, _, number = reference.partition("/")
        if name and number.isdigit():
            return name, None, number
    raise ModelLoadError(f"MODEL_URI {uri!r}: use models:/<name>@<alias> or models:/<name>/<version>")


def resolve_local(path: Path) -> ModelSource:
    """A SavedModel directory, a downloaded MLflow model holding one under ``saved_model/``, or a TF
    Serving base directory (``exports/mnist``: the highest numbered version is taken)."""
    if not path.is_dir():
        raise ModelLoadError(f"MODEL_URI {path}: no such directory")
    if (path / SAVED_MODEL_ARTIFACT / "saved_model.pb").is_file():  # a downloaded MLflow model
        path = path / SAVED_MODEL_ARTIFACT
    if not (path / "saved_model.pb").is_file():
        versions = sorted((int(p.name), p) for p in path.iterdir() if p.name.isdigit() and (p / "saved_model.pb").is_file())
        if not versions:
            raise ModelLoadError(f"MODEL_URI {path}: no saved_model.pb here nor in numbered version directories")
        path = versions[-1][1]
    return ModelSource(name=REGISTERED_MODEL, version=path.name if path.name.isdigit() else "1", location=str(path))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _bound_registry_calls(timeout_s: float) -> None:
    """MLflow retries an unreachable server 7 times with exponential backoff (minutes); a service
    that cannot reach its registry should say so within ``timeout_s`` (the user's own settings win)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, int(timeout_s / 2))))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def _signature_defs(path: str) -> dict[str, Any]:
    """Every SignatureDef of the SavedModel's MetaGraph (TF Serving's metadata lists them all); raises
    KeyError without the serving signature."""
    from tensorflow.python.saved_model import loader_impl

    signature_defs = dict(loader_impl.parse_saved_model(path).meta_graphs[0].signature_def)
    if SIGNATURE.name not in signature_defs:
        raise KeyError(f"no {SIGNATURE.name!r} signature (it has {sorted(signature_defs)})")
    return signature_defs
