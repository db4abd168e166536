"""MNIST from one of three sources, validated before any training starts.

Sources: ``keras`` (``keras.datasets.mnist.load_data()``, downloads and caches), ``npz`` (a file in
Keras's ``mnist.npz`` layout) and ``idx`` (a directory of the original IDX files, optionally
gzipped). The choice comes from ``--data``, then ``$PIPELINE_DATA``, then the config.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from contract import IMAGE_SHAPE, NUM_CLASSES
from pipeline.errors import DataError

if TYPE_CHECKING:
    from pipeline.config import DataConfig

DATA_ENV_VAR = "PIPELINE_DATA"

IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
_IDX_MAGIC = {3: 0x00000803, 1: 0x00000801}


@dataclass(frozen=True)
class DataSpec:
    source: str  # keras | npz | idx
    path: str | None = None

    @property
    def shown_path(self) -> str | None:
        """The path as run pages show it: relative to the working directory, never a machine's absolute
        path (the content is identified by the ``data_digest`` tag)."""
        return None if self.path is None else os.path.relpath(self.path)

    def describe(self) -> str:
        return self.source if self.path is None else f"{self.source}:{self.shown_path}"


@dataclass(frozen=True)
class Splits:
    """uint8 images ``[N, 28, 28]`` and uint8 labels ``[N]`` for each split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@dataclass(frozen=True)
class MnistData:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    spec: DataSpec

    @property
    def digest(self) -> str:
        """A short content hash of all four arrays: equal data, equal digest."""
        h = hashlib.sha256()
        for array in (self.x_train, self.y_train, self.x_test, self.y_test):
            h.update(str(array.shape).encode())
            h.update(np.ascontiguousarray(array).tobytes())
        return h.hexdigest()[:16]

    def split(self, validation_split: float, seed: int, train_limit: int | None = None) -> Splits:
        """Seeded shuffle of the training set into train/validation; the test set is untouched.
        ``train_limit`` keeps only the first that many training images (a random subset)."""
        order = np.random.default_rng(seed).permutation(len(self.x_train))
        n_val = max(1, int(round(len(order) * validation_split)))
        val, train = order[:n_val], order[n_val:][:train_limit]
        return Splits(
            self.x_train[train],
            self.y_train[train],
            self.x_train[val],
            self.y_train[val],
            self.x_test,
            self.y_test,
        )


def resolve_spec(cli_value: str | None, config_source: str, config_path: str | None) -> DataSpec:
    """``--data`` wins over ``$PIPELINE_DATA``, which wins over the config.

    ``--data``/``$PIPELINE_DATA`` take ``keras``, a ``.npz`` file or a directory of IDX files.
    """
    value = cli_value or os.environ.get(DATA_ENV_VAR)
    if not value:
        return DataSpec(config_source, config_path)
    if value == "keras":
        return DataSpec("keras")
    for source in ("npz", "idx", "keras"):
        if value.startswith(f"{source}:"):
            return DataSpec(source, value.split(":", 1)[1] or None)
    return DataSpec("idx" if Path(value).is_dir() else "npz", value)


def load(spec: DataSpec) -> MnistData:
    """Load and validate; raises :class:`DataError` naming the problem."""
    if spec.source == "keras":
        arrays = _load_keras()
    elif spec.source == "npz":
        arrays = _load_npz(_require_path(spec))
    elif spec.source == "idx":
        arrays = _load_idx(_require_path(spec))
    else:
        raise DataError(f"unknown data source {spec.source!r} (use keras, npz or idx)")
    for name, array in arrays.items():
        _check(name, array, spec)
    for split in ("train", "test"):
        if len(arrays[f"x_{split}"]) != len(arrays[f"y_{split}"]):
            raise DataError(
                f"{spec.describe()}: x_{split} has {len(arrays[f'x_{split}'])} images but "
                f"y_{split} has {len(arrays[f'y_{split}'])} labels"
            )
    arrays["y_train"] = arrays["y_train"].astype(np.uint8)
    arrays["y_test"] = arrays["y_test"].astype(np.uint8)
    return MnistData(spec=spec, **arrays)


def prepare(spec: DataSpec, cfg: DataConfig, seed: int) -> tuple[MnistData, Splits]:
    """The data as the job, a training cluster's workers and every trial of a search see it: loaded,
    validated, and split by the config's validation fraction and training limit with its seed."""
    data = load(spec)
    return data, data.split(cfg.validation_split, seed, cfg.train_limit)


def _require_path(spec: DataSpec) -> Path:
    if not spec.path:
        raise DataError(f"data source {spec.source!r} needs a path")
    path = Path(spec.path).expanduser()
    if not path.exists():
        raise DataError(f"data file or directory not found: {path}")
    return path


def _load_keras() -> dict[str, np.ndarray]:
    import keras

    try:
        (x_train, y_train), (x_test, y_test) = keras.datasets.mnist.load_data()
    except Exception as exc:  # network errors come in many types
        raise DataError(
            f"could not download MNIST through keras ({type(exc).__name__}: {exc}); "
            f"offline, point --data or ${DATA_ENV_VAR} at a local mnist .npz or IDX directory"
        ) from None
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    if path.is_dir():
        raise DataError(f"{path} is a directory; npz source needs a .npz file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [key for key in IDX_FILES if key not in npz.files]
            if missing:
                raise DataError(
                    f"{path}: missing arrays {', '.join(missing)} "
                    f"(a Keras-layout MNIST .npz has x_train, y_train, x_test, y_test; found {', '.join(npz.files) or 'none'})"
                )
            return {key: npz[key] for key in IDX_FILES}
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None


def _load_idx(directory: Path) -> dict[str, np.ndarray]:
    if not directory.is_dir():
        raise DataError(f"{directory} is not a directory; idx source needs a directory of IDX files")
    arrays = {}
    for key, stem in IDX_FILES.items():
        candidates = [directory / stem, directory / f"{stem}.gz"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise DataError(f"{directory}: missing IDX file {stem}[.gz]")
        arrays[key] = read_idx(path, ndim=3 if key.startswith("x") else 1)
    return arrays


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read one IDX file (uint8 payload) as written by LeCun et al."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    magic = int.from_bytes(raw[:4], "big")
    if magic != _IDX_MAGIC[ndim]:
        raise DataError(f"{path}: bad IDX magic number {magic:#010x}, expected {_IDX_MAGIC[ndim]:#010x}")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(f"{path}: header says {dims} ({expected} bytes) but holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _check(name: str, array: np.ndarray, spec: DataSpec) -> None:
    where = f"{spec.describe()}: {name}"
    if name.startswith("x"):
        if array.dtype != np.uint8:
            raise DataError(f"{where} has dtype {array.dtype}, expected uint8 pixels")
        if array.ndim != 3 or array.shape[1:] != IMAGE_SHAPE:
            raise DataError(f"{where} has shape {array.shape}, expected (N, {IMAGE_SHAPE[0]}, {IMAGE_SHAPE[1]})")
    else:
        if not np.issubdtype(array.dtype, np.integer):
            raise DataError(f"{where} has dtype {array.dtype}, expected integer labels")
        if array.ndim != 1:
            raise DataError(f"{where} has shape {array.shape}, expected (N,)")
        if array.size and (array.min() < 0 or array.max() >= NUM_CLASSES):
            bad = int(array.min()) if array.min() < 0 else int(array.max())
            raise DataError(f"{where} has label {bad}; labels must be 0-{NUM_CLASSES - 1}")
    if len(array) == 0:
        raise DataError(f"{where} is empty")
