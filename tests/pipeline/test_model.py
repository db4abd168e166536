import keras
import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.model import ElasticDistortion, _bilinear, build_model, first_conv_layer


def test_seed_has_the_notebooks_8790_parameters():
    model = build_model(load_config("seed").model)
    assert model.count_params() == 8790
    assert [layer.__class__.__name__ for layer in model.layers] == [
        "InputLayer",
        "Conv2D",
        "MaxPooling2D",
        "Conv2D",
        "MaxPooling2D",
        "Flatten",
        "Dense",
    ]


def test_models_map_raw_pixels_to_probabilities(sample):
    images = sample["x_test"][:8].astype(np.float32)[..., None]
    for name in ("seed", "champion"):
        model = build_model(load_config(name).model)
        probabilities = np.asarray(model(images, training=False))
        assert probabilities.shape == (8, 10)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_champion_scales_inside_the_model_and_seed_does_not():
    champion = build_model(load_config("champion").model)
    seed = build_model(load_config("seed").model)
    assert any(layer.name == "rescale" for layer in champion.layers)
    assert not any(layer.name == "rescale" for layer in seed.layers)
    assert first_conv_layer(seed).filters == 6


def test_a_stride_2_block_halves_the_maps_without_pooling():
    cfg = load_config(
        "champion",
        ["model.conv_blocks=[{filters: 8, kernel_size: 5, strides: 2, pool: false}, {filters: 16}]", "model.dense_units=[]"],
    )
    model = build_model(cfg.model)
    first = first_conv_layer(model)
    assert first.strides == (2, 2) and first.output.shape[1:] == (14, 14, 8)
    assert [layer.name for layer in model.layers if isinstance(layer, keras.layers.MaxPooling2D)] == ["pool2"]
    assert model.get_layer("flatten").output.shape[1:] == (7 * 7 * 16,)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.conv_blocks=[{filters: 8, strides: 3}]", "strides"),
        ("model.augmentation={elastic: {alpha: 0, sigma: 4}}", "alpha"),
        ("model.augmentation={elastic: {alpha: 30}}", "sigma"),
    ],
)
def test_bad_strides_and_elastic_settings_are_refused_by_name(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("champion", [override])


def test_elastic_distortion_moves_strokes_smoothly_in_training_and_is_the_identity_otherwise(sample):
    images = sample["x_test"][:64].astype(np.float32)[..., None]
    layer = ElasticDistortion(alpha=34.0, sigma=4.0, seed=1)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(images, training=False)), images)
    distorted = keras.ops.convert_to_numpy(layer(images, training=True))
    assert distorted.shape == images.shape and distorted.min() >= 0 and distorted.max() <= 255
    changed = np.abs(distorted - images).mean(axis=(1, 2, 3))
    assert (changed > 1).all()  # every image moved
    # a smooth field keeps the digit: ink stays about the same, and stays in the middle of the image
    ink, ink_after = images.sum(axis=(1, 2, 3)), distorted.sum(axis=(1, 2, 3))
    ratio = ink_after / ink
    assert 0.9 < np.median(ratio) < 1.1 and ratio.min() > 0.5 and ratio.max() < 1.6, ratio
    grid = np.arange(28, dtype=np.float32)

    def centroid(batch: np.ndarray) -> np.ndarray:
        mass = batch[..., 0]
        return np.stack([(mass.sum(2) * grid).sum(1), (mass.sum(1) * grid).sum(1)], -1) / mass.sum((1, 2))[:, None]

    shift = np.abs(centroid(distorted) - centroid(images))  # pixels; the field moves about 1.4 px (std)
    assert shift.max() < 4.0 and shift.mean() < 1.5, shift
    again = keras.ops.convert_to_numpy(layer(images, training=True))
    assert not np.array_equal(again, distorted)  # a new field for every batch


def test_bilinear_sampling_matches_scipy_inside_the_image():
    from scipy.ndimage import map_coordinates

    rng = np.random.default_rng(0)
    images = rng.random((3, 28, 28, 2)).astype(np.float32)
    rows, cols = (rng.uniform(0, 27, (3, 28, 28)).astype(np.float32) for _ in range(2))
    got = keras.ops.convert_to_numpy(_bilinear(images, rows, cols))
    expected = np.stack(
        [np.stack([map_coordinates(images[n, ..., c], [rows[n], cols[n]], order=1) for c in range(2)], -1) for n in range(3)]
    )
    np.testing.assert_allclose(got, expected, atol=1e-5)
