import numpy as np

from pipeline.config import load_config
from pipeline.model import build_model, first_conv_layer


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
