"""The pipeline and the service agree through ``contract``: a model the pipeline exports and registers
is found, loaded and called by the service's runtime using only the contract's names and shapes."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.saved_model import loader_impl

import contract
from service.runtime import ModelRuntime

pytestmark = pytest.mark.slow


def test_the_export_has_the_contracts_signature(trained_registry):
    export = trained_registry.export_path
    assert export.parent == contract.servable_dir(trained_registry.workdir / "exports")
    signature = loader_impl.parse_saved_model(str(export)).meta_graphs[0].signature_def[contract.SIGNATURE.name]
    ((name, pixels),) = signature.inputs.items()
    assert name == contract.SIGNATURE.input and pixels.dtype == tf.uint8.as_datatype_enum
    assert [d.size for d in pixels.tensor_shape.dim] == [-1, *contract.IMAGE_SHAPE]
    outputs = {key: (value.dtype, [d.size for d in value.tensor_shape.dim]) for key, value in signature.outputs.items()}
    assert outputs == {
        contract.SIGNATURE.probabilities: (tf.float32.as_datatype_enum, [-1, contract.NUM_CLASSES]),
        contract.SIGNATURE.digit: (tf.int64.as_datatype_enum, [-1]),
    }


def test_the_service_finds_the_champion_by_the_contracts_names_and_predicts_what_the_export_does(
    trained_registry, sample, tmp_path
):
    images = sample["x_test"][:32]
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")  # the runtime must not rely on the process-wide URI
    exported = tf.saved_model.load(str(trained_registry.export_path)).signatures[contract.SIGNATURE.name]
    expected = exported(**{contract.SIGNATURE.input: tf.constant(images)})[contract.SIGNATURE.probabilities].numpy()
    for model_uri in (contract.registry_uri(), str(contract.servable_dir(trained_registry.workdir / "exports"))):
        runtime = ModelRuntime(model_uri, trained_registry.tracking_uri)
        try:
            info = runtime.start()
            prediction = runtime.predict(images)
        finally:
            runtime.stop()
        assert (info.name, info.version) == (contract.REGISTERED_MODEL, "1"), model_uri
        assert prediction.probabilities.shape == (len(images), contract.NUM_CLASSES)
        np.testing.assert_allclose(prediction.probabilities, expected, atol=1e-6)
        np.testing.assert_array_equal(prediction.digits, expected.argmax(1))
        if model_uri.startswith("models:/"):  # the registry tag the service shows
            assert info.test_accuracy == pytest.approx(trained_registry.result["test_accuracy"], abs=1e-6)
    mlflow.set_tracking_uri(previous)
