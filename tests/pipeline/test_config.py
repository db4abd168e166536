import pytest

from pipeline.config import ConfigError, available_configs, load_config


def test_named_configs_are_available():
    assert {"seed", "champion"} <= set(available_configs())


def test_seed_reproduces_the_notebook():
    cfg = load_config("seed")
    assert cfg.model.rescale is False
    assert [(b.filters, b.kernel_size) for b in cfg.model.conv_blocks] == [(6, 3), (16, 3)]
    assert (cfg.training.optimizer, cfg.training.epochs, cfg.training.batch_size) == ("rmsprop", 10, 128)
    assert cfg.data.validation_split == 0.3


def test_overrides_by_dotted_path_and_by_unique_leaf():
    cfg = load_config("seed", ["training.epochs=3", "batch_size=64", "accuracy_floor=0.5", "model.dense_units=[32]"])
    assert cfg.training.epochs == 3
    assert cfg.training.batch_size == 64
    assert cfg.registry.accuracy_floor == 0.5
    assert cfg.model.dense_units == [32]


def test_override_can_fill_a_null_section():
    cfg = load_config("seed", ["model.augmentation.rotation=0.1"])
    assert cfg.model.augmentation.rotation == 0.1


def test_flat_params_cover_every_setting():
    flat = load_config("champion").flat()
    assert flat["training.learning_rate"] == 0.003
    assert flat["model.augmentation.zoom"] == 0.08
    assert "registry.accuracy_floor" in flat


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["nonsense=1"], "nonsense"),
        (["epochs=-1"], "training.epochs"),
        (["training.optimizer=adagrad"], "training.optimizer"),
        (["epochs"], "key=value"),
        (["training.colour=blue"], "colour"),
    ],
)
def test_bad_overrides_name_the_problem(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("seed", overrides)


def test_unknown_config_lists_the_named_ones():
    with pytest.raises(ConfigError, match="seed"):
        load_config("no-such-config")


def test_invalid_yaml_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(path))


def test_the_plan_line_says_what_training_does_and_how_long_it_should_take():
    from pipeline.job import plan

    cfg = load_config("champion", ["epochs=2", "estimate.images_per_s=850"])
    line = plan(cfg, 8500)  # 2 epochs x 8,500 images at 850 images/s = 20 s
    assert "up to 2 epochs on 8,500 images (batch 128)" in line and "expect about 20 s of training" in line
    assert "expect" not in plan(load_config("champion", ["estimate.images_per_s=null"]), 8500)


def test_the_estimate_is_not_logged_as_a_hyperparameter():
    assert not [key for key in load_config("champion").flat() if key.startswith("estimate")]


def test_with_values_sets_dotted_keys_on_a_loaded_config_and_validates_them():
    from pipeline.config import with_values

    base = load_config("champion")
    cfg = with_values(base, {"training.epochs": 3, "model.augmentation.elastic": {"alpha": 12, "sigma": 4}})
    assert cfg.training.epochs == 3 and cfg.model.augmentation.elastic.alpha == 12
    assert base.training.epochs != 3  # the base is left as it was
    with pytest.raises(ConfigError, match="training.epochs"):
        with_values(base, {"training.epochs": 0})
