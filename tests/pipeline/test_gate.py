from pipeline.gate import decide


def test_first_model_above_floor_is_promoted():
    decision = decide(0.97, None, floor=0.95)
    assert decision.promote
    assert "no champion" in decision.reason


def test_below_floor_is_not_promoted_even_without_champion():
    decision = decide(0.90, None, floor=0.95)
    assert not decision.promote
    assert "floor" in decision.reason


def test_better_or_equal_than_champion_is_promoted():
    assert decide(0.99, 0.98, floor=0.95).promote
    assert decide(0.98, 0.98, floor=0.95).promote


def test_worse_than_champion_is_not_promoted():
    decision = decide(0.97, 0.98, floor=0.95)
    assert not decision.promote
    assert "champion" in decision.reason
    assert (decision.candidate_accuracy, decision.champion_accuracy) == (0.97, 0.98)
