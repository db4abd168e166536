"""Folding batch normalization at export: the exported graph answers as the trained model does."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from contract import SIGNATURE
from pipeline.config import load_config
from pipeline.errors import ExportError
from pipeline.export import export_to_staging, fold_batch_norm, verify_export
from pipeline.model import ElasticDistortion, build_model, compile_model, model_input

TINY_BN = [
    "model.conv_blocks=[{filters: 8, kernel_size: 5, strides: 2, pool: false}, {filters: 12}]",
    "model.dense_units=[16]",
    "model.batch_norm=true",
    "model.augmentation={rotation: 0.02, elastic: {alpha: 8, sigma: 3}}",
    "model.conv_dropout=0.1",
    "model.dense_dropout=0.2",
]


@pytest.fixture(scope="module")
def trained_bn_model(sample) -> keras.Model:
    """A tiny model with batch normalization after every conv and dense layer, trained one epoch on the
    sample, so its BN statistics are real (not the identity they start as)."""
    cfg = load_config("champion", [*TINY_BN, "training.epochs=1"])
    keras.utils.set_random_seed(0)
    model = build_model(cfg.model)
    compile_model(model, cfg.training, steps_per_epoch=32)
    labels = keras.utils.to_categorical(sample["y_train"], 10)
    model.fit(model_input(sample["x_train"]), labels, batch_size=64, epochs=1, verbose=0)
    moving_means = [layer.moving_mean for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert all(np.abs(keras.ops.convert_to_numpy(mean)).max() > 0 for mean in moving_means)
    return model


def test_folded_model_has_no_batch_norm_or_training_only_layers_and_gives_the_same_digits(trained_bn_model, sample):
    folded = fold_batch_norm(trained_bn_model)
    kinds = {type(layer) for layer in folded.layers}
    assert keras.layers.BatchNormalization not in kinds
    assert not kinds & {keras.layers.Dropout, keras.layers.RandomRotation, ElasticDistortion}
    images = model_input(sample["x_test"])
    expected = keras.ops.convert_to_numpy(trained_bn_model(images, training=False))
    got = keras.ops.convert_to_numpy(folded(images, training=False))
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert folded.count_params() < trained_bn_model.count_params()  # gamma, beta, mean, variance are gone


def test_the_export_is_folded_and_verified_against_the_unfolded_model(trained_bn_model, sample, tmp_path):
    staging = export_to_staging(trained_bn_model, tmp_path)
    verify_export(staging, trained_bn_model, sample["x_test"])
    graph = tf.saved_model.load(str(staging)).signatures[SIGNATURE.name].graph.as_graph_def()
    ops = {node.op for function in graph.library.function for node in function.node_def} | {node.op for node in graph.node}
    assert "FusedBatchNormV3" not in ops and not any("batchnorm" in node.name.lower() for node in graph.node)


def test_a_wrong_fold_fails_verification(trained_bn_model, sample, tmp_path):
    broken = fold_batch_norm(trained_bn_model)
    conv = next(layer for layer in broken.layers if isinstance(layer, keras.layers.Conv2D))
    kernel, bias = conv.get_weights()
    conv.set_weights([kernel, bias + 0.5])  # as if the BN shift had been left out
    with pytest.raises(ExportError, match="disagrees|different digits"):
        verify_export(export_to_staging(broken, tmp_path), trained_bn_model, sample["x_test"])


def test_a_model_without_batch_norm_is_exported_as_it_is():
    model = build_model(load_config("seed").model)
    assert fold_batch_norm(model) is model
