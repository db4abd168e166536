"""What ``MODEL_URI`` resolves to, in-process (no model is loaded: resolution only reads names and files)."""

from __future__ import annotations

from pathlib import Path

import pytest

import contract
from service.runtime import ModelInfo, ModelLoadError, ModelRuntime, parse_registry_uri, resolve_local


def saved_model(directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "saved_model.pb").write_bytes(b"")
    return directory


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("models:/mnist-cnn@champion", ("mnist-cnn", "champion", None)),
        ("models:/mnist-cnn/12", ("mnist-cnn", None, "12")),
        ("models:/mnist-cnn/12/", ("mnist-cnn", None, "12")),
        (contract.registry_uri(), (contract.REGISTERED_MODEL, contract.CHAMPION, None)),
    ],
)
def test_registry_uris_name_a_model_and_an_alias_or_a_version(uri, expected):
    assert parse_registry_uri(uri) == expected


@pytest.mark.parametrize("uri", ["models:/mnist-cnn", "models:/mnist-cnn/latest", "models:/@champion", "models:/mnist-cnn@"])
def test_incomplete_registry_uris_are_refused_with_the_forms_that_work(uri):
    with pytest.raises(ModelLoadError, match="models:/<name>@<alias>"):
        parse_registry_uri(uri)


def test_a_tf_serving_base_directory_resolves_to_its_highest_numbered_version(tmp_path):
    base = contract.servable_dir(tmp_path)
    for version in ("2", "10", "9"):
        saved_model(base / version)
    (base / "11").mkdir()  # no saved_model.pb: not a version
    (base / ".staging-1").mkdir()
    source = resolve_local(base)
    assert (source.name, source.version, source.location, source.is_local) == (
        contract.REGISTERED_MODEL,
        "10",
        str(base / "10"),
        True,
    )
    assert source.key == str((base / "10").resolve())


def test_a_downloaded_mlflow_model_resolves_to_the_savedmodel_it_carries(tmp_path):
    inner = saved_model(tmp_path / "model" / contract.SAVED_MODEL_ARTIFACT)
    assert resolve_local(tmp_path / "model").location == str(inner)
    assert resolve_local(inner).version == "1"  # a directory that is not numbered


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root / "missing", "no such directory"),
        (lambda root: root, "no saved_model.pb"),
    ],
)
def test_local_directories_without_a_model_are_refused(tmp_path, make, message):
    with pytest.raises(ModelLoadError, match=message):
        resolve_local(make(tmp_path))


def test_a_missing_sqlite_store_is_named_and_never_created(tmp_path):
    store = tmp_path / "nowhere" / contract.EMBEDDED_DB
    runtime = ModelRuntime(contract.registry_uri(), f"sqlite:///{store}")
    with pytest.raises(ModelLoadError, match="does not exist"):
        runtime.check()
    assert not store.parent.exists()


def test_unsupported_schemes_are_refused():
    with pytest.raises(ModelLoadError, match="models:/<name>@<alias>"):
        ModelRuntime("s3://bucket/model", "sqlite:///unused.db").check()


def test_model_info_shown_to_clients_hides_this_workers_paths():
    info = ModelInfo("mnist-cnn", "3", None, None, None, "/srv/exports/mnist/3", "/srv/exports/mnist/3", "now")
    public = info.as_dict()
    assert "path" not in public and public["source"] == "local SavedModel directory"


def test_a_loaded_model_is_called_once_at_every_batch_size_of_the_warm_up():
    shapes = []

    class RecordingModel:  # stands in for a LoadedModel: only its calls matter here
        def predict(self, pixels):
            shapes.append(pixels.shape)

    ModelRuntime("models:/mnist-cnn@champion", "sqlite:///unused.db", warmup_batch_sizes=5)._warm_up(RecordingModel())
    assert shapes == [(size, *contract.IMAGE_SHAPE) for size in range(1, 6)]
