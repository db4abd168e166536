"""Search space files and the pruning rule, in-process: bad files fail before any trial, naming the key."""

from __future__ import annotations

import optuna
import pytest

from pipeline.config import ConfigError, load_config
from pipeline.search_space import Pruning, load_space
from pipeline.tune import should_prune
from tests.helpers import FIXTURES


def space_file(tmp_path, text: str):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_the_committed_spaces_load_and_every_bound_is_a_value_their_config_accepts():
    champion = load_space("champion")
    champion.check_against(champion.base, [])
    assert champion.base == "champion" and "model.conv_blocks" in champion.params
    tiny = load_space(str(FIXTURES / "search-tiny.yaml"))
    tiny.check_against(tiny.base, ["epochs=2"])


def test_a_sample_is_a_config_the_pipeline_trains():
    space = load_space("champion")
    trial = optuna.trial.FixedTrial(
        {
            "model.conv_blocks.blocks": 3,
            "model.conv_blocks.convs": 2,
            "model.conv_blocks.kernel_size": 5,
            **{f"model.conv_blocks.{i}.filters": 8 * (i + 1) for i in range(3)},
            "model.global_pooling": True,
            "model.dense_units": "[32]",  # list choices travel as JSON text
            "model.batch_norm": True,
            "model.conv_dropout": 0.1,
            "model.dense_dropout": 0.2,
            "model.augmentation.rotation": 0.01,
            "model.augmentation.translation": 0.05,
            "model.augmentation.zoom": 0.05,
            "training.optimizer": "sgd",
            "training.learning_rate": 0.002,
            "training.lr_schedule": "constant",
            "training.label_smoothing": 0.05,
            "training.batch_size": 64,
            "training.epochs": 5,
        }
    )
    cfg = load_config("champion", [], space.sample(trial))
    assert [(b.filters, b.kernel_size, b.convs) for b in cfg.model.conv_blocks] == [(8, 5, 2), (16, 5, 2), (24, 5, 2)]
    assert cfg.model.dense_units == [32] and cfg.model.global_pooling and cfg.training.optimizer == "sgd"


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("params:\n  training.learnig_rate: {float: [0.001, 0.01]}\n", "'training.learnig_rate' is not a config setting"),
        (
            "params:\n  training.learning_rate: {float: [0.01, 0.001]}\n",
            "training.learning_rate: the range [0.01, 0.001] is empty",
        ),
        ("params:\n  training.epochs: {int: [3, 3]}\n", "training.epochs: the range [3, 3] is empty"),
        ("params:\n  training.batch_size: {choice: [big, 128]}\n", "training.batch_size: 'big' is not accepted"),
        ("params:\n  training.epochs: {int: [1.5, 3]}\n", "training.epochs: int needs [low, high] as integers"),
        ("params:\n  model.conv_dropout: {float: [0.0, 1.5]}\n", "model.conv_dropout: 1.5 is not accepted"),
        (
            "params:\n  training.learning_rate: {float: [0, 0.1], log: true}\n",
            "training.learning_rate: a log scale needs low > 0",
        ),
        ("params:\n  training.optimizer: {choice: []}\n", "training.optimizer: choice needs a non-empty list"),
        ("params:\n  training.epochs: {int: [1, 3], lgo: true}\n", "training.epochs: give exactly one of int, float or choice"),
        (
            "params:\n  model.conv_blocks: {blocks: {int: [1, 2]}}\n",
            "model.conv_blocks needs exactly blocks, filters, convs, kernel_size",
        ),
        ("params: {}\n", "needs a non-empty `params`"),
        ("params:\n  training.epochs: {int: [1, 3]}\nprunning: {}\n", "unknown section(s) prunning"),
        ("params:\n  training.epochs: {int: [1, 3]}\npruning: {percentile: 150}\n", "0 <= percentile <= 100"),
    ],
)
def test_a_bad_space_is_refused_naming_the_key_and_the_problem(tmp_path, text, names):
    with pytest.raises(ConfigError) as error:
        space = load_space(str(space_file(tmp_path, text)))
        space.check_against("champion", [])
    assert names in str(error.value)


def test_a_missing_space_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="search space 'nope' not found"):
        load_space("nope")


PRUNING = Pruning(startup_trials=2, warmup_epochs=1, percentile=50)
COMPLETED = [[0.50, 0.80, 0.90], [0.60, 0.85, 0.95], [0.40, 0.70]]


@pytest.mark.parametrize(
    ("completed", "epoch", "accuracy", "pruned"),
    [
        (COMPLETED, 0, 0.10, False),  # still warming up
        (COMPLETED, 1, 0.60, True),  # below the median 0.80 of the three at epoch 1
        (COMPLETED, 1, 0.80, False),  # at the median
        (COMPLETED, 2, 0.91, True),  # below 0.925, the median of the two that reached epoch 2
        (COMPLETED[:1], 1, 0.10, False),  # one completed trial is fewer than startup_trials
        (COMPLETED, 5, 0.10, False),  # no completed trial got this far
    ],
)
def test_the_pruning_rule(completed, epoch, accuracy, pruned):
    assert should_prune(completed, epoch, accuracy, PRUNING) is pruned
