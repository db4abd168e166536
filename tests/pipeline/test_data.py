import gzip

import numpy as np
import pytest

from pipeline.data import DATA_ENV_VAR, DataError, DataSpec, load, resolve_spec


def write_idx(path, array, gz=False):
    ndim = array.ndim
    header = (0x800 | ndim).to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(f"{path}.gz", "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def write_idx_dir(directory, sample, gz):
    names = {
        "x_train": "train-images-idx3-ubyte",
        "y_train": "train-labels-idx1-ubyte",
        "x_test": "t10k-images-idx3-ubyte",
        "y_test": "t10k-labels-idx1-ubyte",
    }
    for key, name in names.items():
        write_idx(directory / name, sample[key], gz=gz)


def save_npz(path, sample, **changes):
    arrays = {**sample, **changes}
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return DataSpec("npz", str(path))


def test_npz_source_loads_the_sample(sample_npz, sample):
    data = load(DataSpec("npz", str(sample_npz)))
    assert data.x_train.shape == (2000, 28, 28) and data.x_train.dtype == np.uint8
    np.testing.assert_array_equal(data.y_test, sample["y_test"])


@pytest.mark.parametrize("gz", [False, True])
def test_idx_source_reads_what_the_npz_holds(tmp_path, sample, gz):
    write_idx_dir(tmp_path, sample, gz)
    data = load(DataSpec("idx", str(tmp_path)))
    for key in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(data, key), sample[key])


def test_digest_tells_different_data_apart(tmp_path, sample):
    a = load(save_npz(tmp_path / "a.npz", sample))
    b = load(save_npz(tmp_path / "b.npz", sample, y_train=np.roll(sample["y_train"], 1)))
    assert a.digest == load(save_npz(tmp_path / "c.npz", sample)).digest
    assert a.digest != b.digest


def test_split_is_seeded_disjoint_and_leaves_test_alone(sample_npz):
    data = load(DataSpec("npz", str(sample_npz)))
    first, again, other = data.split(0.25, seed=1), data.split(0.25, seed=1), data.split(0.25, seed=2)
    assert len(first.x_val) == 500 and len(first.x_train) == 1500
    np.testing.assert_array_equal(first.x_val, again.x_val)
    assert not np.array_equal(first.y_val, other.y_val)
    np.testing.assert_array_equal(first.x_test, data.x_test)
    train_rows = {row.tobytes() for row in first.x_train}
    assert not any(row.tobytes() in train_rows for row in first.x_val)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"x_train": None}, "missing arrays x_train"),
        ({"x_train": np.zeros((10, 28, 27), np.uint8)}, r"x_train has shape \(10, 28, 27\)"),
        ({"x_test": np.zeros((5, 28, 28), np.float32)}, "x_test has dtype float32"),
        ({"y_train": np.full(2000, 10)}, "label 10"),
        ({"y_test": np.full(500, -1)}, "label -1"),
        ({"y_test": np.zeros(500, np.float64)}, "y_test has dtype float64"),
        ({"y_train": np.zeros(3, np.uint8)}, "2000 images but y_train has 3 labels"),
        ({"x_test": np.zeros((0, 28, 28), np.uint8), "y_test": np.zeros(0, np.uint8)}, "x_test is empty"),
    ],
)
def test_bad_npz_contents_are_named(tmp_path, sample, changes, message):
    with pytest.raises(DataError, match=message):
        load(save_npz(tmp_path / "bad.npz", sample, **changes))


def test_missing_file_and_wrong_kind_of_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load(DataSpec("npz", str(tmp_path / "nope.npz")))
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        load(DataSpec("npz", str(garbage)))
    with pytest.raises(DataError, match="missing IDX file train-images"):
        load(DataSpec("idx", str(tmp_path)))
    with pytest.raises(DataError, match="unknown data source"):
        load(DataSpec("csv", str(garbage)))


def test_idx_with_bad_magic_or_truncated_payload(tmp_path, sample):
    write_idx_dir(tmp_path, sample, gz=False)
    labels = tmp_path / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-10])
    with pytest.raises(DataError, match="header says"):
        load(DataSpec("idx", str(tmp_path)))
    images = tmp_path / "train-images-idx3-ubyte"
    images.write_bytes(b"\x00\x00\x09\x99" + images.read_bytes()[4:])
    with pytest.raises(DataError, match="bad IDX magic"):
        load(DataSpec("idx", str(tmp_path)))


def test_cli_value_beats_env_var_beats_config(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_ENV_VAR, raising=False)
    assert resolve_spec(None, "keras", None) == DataSpec("keras")
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path / "env.npz"))
    assert resolve_spec(None, "keras", None) == DataSpec("npz", str(tmp_path / "env.npz"))
    assert resolve_spec(str(tmp_path), "keras", None) == DataSpec("idx", str(tmp_path))
    assert resolve_spec("keras", "npz", "x.npz") == DataSpec("keras")
