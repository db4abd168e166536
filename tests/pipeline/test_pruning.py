"""The pruning rules a two-objective study applies itself (Optuna prunes only single-objective studies)."""

from __future__ import annotations

import pytest

from pipeline.search_space import Pruning
from pipeline.tune import halving_prunes, hyperband_brackets, should_prune


def test_successive_halving_judges_only_at_rungs_and_keeps_the_best_third():
    others = [[0.5, 0.6, 0.7], [0.4, 0.5, 0.6], [0.3, 0.4, 0.5], [0.2, 0.3, 0.4], [0.1, 0.2, 0.3]]
    # rungs at epochs 1, 3, 9 (first rung 1, factor 3); epoch index 1 is epoch 2: never judged
    assert not halving_prunes(others, epoch=1, accuracy=0.0, first_rung=1, reduction_factor=3)
    # at epoch 1, six trials compete (five others and this one): the best two go on
    assert not halving_prunes(others, epoch=0, accuracy=0.45, first_rung=1, reduction_factor=3)
    assert halving_prunes(others, epoch=0, accuracy=0.35, first_rung=1, reduction_factor=3)
    # at epoch 3 (index 2)
    assert halving_prunes(others, epoch=2, accuracy=0.55, first_rung=1, reduction_factor=3)
    assert not halving_prunes(others, epoch=2, accuracy=0.65, first_rung=1, reduction_factor=3)


def test_successive_halving_lets_the_best_go_on_when_few_trials_reached_the_rung():
    assert not halving_prunes([], epoch=0, accuracy=0.1, first_rung=1, reduction_factor=3)
    assert not halving_prunes([[0.2]], epoch=0, accuracy=0.3, first_rung=1, reduction_factor=3)
    assert halving_prunes([[0.2]], epoch=0, accuracy=0.1, first_rung=1, reduction_factor=3)
    assert not halving_prunes([[0.9, 0.9]], epoch=1, accuracy=0.1, first_rung=1, reduction_factor=3)  # epoch 2: no rung


@pytest.mark.parametrize(
    ("min_epochs", "factor", "max_epochs", "brackets"), [(1, 3, 1, 1), (1, 3, 3, 2), (1, 3, 12, 3), (2, 2, 16, 4)]
)
def test_hyperband_runs_a_bracket_for_each_first_rung_up_to_the_last_epoch(min_epochs, factor, max_epochs, brackets):
    assert hyperband_brackets(Pruning(kind="hyperband", min_epochs=min_epochs, reduction_factor=factor), max_epochs) == brackets


def test_the_percentile_rule_waits_for_startup_trials_and_warmup():
    rule = Pruning(startup_trials=2, warmup_epochs=1, percentile=50)
    completed = [[0.5, 0.8], [0.6, 0.9]]
    assert not should_prune(completed, epoch=0, accuracy=0.1, pruning=rule)  # warm-up
    assert should_prune(completed, epoch=1, accuracy=0.5, pruning=rule)
    assert not should_prune(completed[:1], epoch=1, accuracy=0.5, pruning=rule)  # one completed trial is too few
