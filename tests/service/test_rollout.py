"""Champion and challenger in-process (service.rollout): canary shares, sticky keys, shadow copies that
never hold up or replace an answer, version pinning. Real serving cores and batchers over stand-in models."""

from __future__ import annotations

import asyncio
import random
import threading
from dataclasses import dataclass, field

import numpy as np
import pytest

from service.core import ServingCore
from service.errors import NotFound
from service.rollout import CANARY_KEY, Rollout, canary_share
from service.runtime import LoadedModel, ModelInfo, Prediction


@dataclass
class StandIn:
    """A model runtime answering digit ``digit`` for every image, after ``delay_s``."""

    version: str
    digit: int
    gate: threading.Event | None = None  # when given, every call waits for it
    fail: bool = False
    ready: bool = True
    calls: list[int] = field(default_factory=list)

    @property
    def current(self) -> LoadedModel:
        info = ModelInfo("mnist-cnn", self.version, "champion", None, None, "test", "test", "now")
        return LoadedModel(info=info, serve=None, key=self.version, signature_defs={})  # type: ignore[arg-type]

    def predict(self, pixels: np.ndarray) -> Prediction:
        self.calls.append(len(pixels))
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail:
            raise RuntimeError("challenger exploded")
        probabilities = np.zeros((len(pixels), 10), np.float32)
        probabilities[:, self.digit] = 1.0
        return Prediction(probabilities, np.full(len(pixels), self.digit), self.current.info)


class Observed:
    def __init__(self) -> None:
        self.pairs: list[tuple[int, int]] = []
        self.dropped_images = 0

    def compared(self, champion_digits, challenger_digits) -> None:
        self.pairs += list(zip(champion_digits.tolist(), challenger_digits.tolist(), strict=True))

    def dropped(self, images: int) -> None:
        self.dropped_images += images


def core(runtime: StandIn) -> ServingCore:
    return ServingCore(runtime, max_batch_images=64, max_wait_s=5, max_queue_images=1000)  # type: ignore[arg-type]


def rollout(mode: str, champion: StandIn | None = None, challenger: StandIn | None = None, **kwargs) -> Rollout:
    champion = champion or StandIn("1", digit=1)
    challenger = challenger or StandIn("2", digit=2)
    return Rollout(core(champion), core(challenger), mode, rng=random.Random(7), **kwargs)


IMAGE = np.zeros((1, 28, 28), np.uint8)


def test_canary_answers_its_percentage_from_the_challenger_and_each_answer_from_one_version():
    canary = rollout("canary", canary_percent=30)

    async def main() -> list[str]:
        return [(await canary.predict(IMAGE, "http_json")).model.version for _ in range(2000)]

    versions = asyncio.run(main())
    assert set(versions) == {"1", "2"}
    assert 0.25 < versions.count("2") / len(versions) < 0.35  # binomial: 30 % +- 5 points is 4.9 sigma
    canary.close()


def test_a_canary_key_always_gets_the_same_model_and_keys_split_by_the_percentage():
    canary = rollout("canary", canary_percent=40)

    async def version_for(key: str) -> str:
        token = CANARY_KEY.set(key)
        try:
            return (await canary.predict(IMAGE, "http_json")).model.version
        finally:
            CANARY_KEY.reset(token)

    async def main() -> tuple[set[str], list[str]]:
        same = {await version_for("user-42") for _ in range(50)}
        return same, [await version_for(f"user-{i}") for i in range(1000)]

    same, by_key = asyncio.run(main())
    assert len(same) == 1
    assert same == {"2" if canary_share("user-42") < 40 else "1"}
    assert 0.34 < by_key.count("2") / len(by_key) < 0.46
    canary.close()


def test_shadow_answers_from_the_champion_and_compares_every_copy():
    observed = Observed()
    challenger = StandIn("2", digit=2)
    shadow = rollout("shadow", challenger=challenger, observer=observed)

    async def main() -> list[Prediction]:
        answers = [await shadow.predict(np.zeros((n, 28, 28), np.uint8), "grpc") for n in (1, 2, 3)]
        await asyncio.sleep(0.2)  # the copies run off the request path
        return answers

    answers = asyncio.run(main())
    assert [a.model.version for a in answers] == ["1", "1", "1"]
    assert all((a.digits == 1).all() for a in answers)
    assert sorted(observed.pairs) == [(1, 2)] * 6 and sum(challenger.calls) == 6
    shadow.close()


def test_a_stuck_challenger_never_holds_up_a_champion_answer_and_its_overflow_is_dropped():
    observed, stuck = Observed(), threading.Event()
    shadow = rollout("shadow", challenger=StandIn("2", digit=2, gate=stuck), observer=observed, shadow_max_images=4)

    async def main() -> list[str]:
        answers = [(await shadow.predict(np.zeros((2, 28, 28), np.uint8), "http_json")).model.version for _ in range(10)]
        stuck.set()  # only now may the challenger answer its copies
        await asyncio.sleep(0.2)
        return answers

    assert asyncio.run(main()) == ["1"] * 10  # all answered while the challenger could answer nothing
    assert observed.dropped_images == 16  # room for 2 requests of 2 images in flight; the other 8 dropped, counted
    assert len(observed.pairs) == 4
    shadow.close()


def test_a_pinned_version_is_answered_by_the_model_that_serves_it():
    pinned = rollout("shadow")

    async def main():
        return [(await pinned.predict(IMAGE, "tf_rest", version)).model.version for version in ("1", "2")]

    assert asyncio.run(main()) == ["1", "2"]
    assert pinned.model("2").info.version == "2" and pinned.model().info.version == "1"
    with pytest.raises(NotFound, match="version 3 is not served"):
        asyncio.run(pinned.predict(IMAGE, "tf_rest", "3"))
    pinned.close()


def test_without_a_loaded_challenger_the_champion_answers_everything():
    canary = rollout("canary", challenger=StandIn("2", digit=2, ready=False), canary_percent=100)

    async def main() -> set[str]:
        return {(await canary.predict(IMAGE, "http_json")).model.version for _ in range(20)}

    assert asyncio.run(main()) == {"1"}
    canary.close()


def test_shadow_percent_copies_only_that_share_of_requests():
    observed = Observed()
    shadow = rollout("shadow", observer=observed, shadow_percent=20)

    async def main() -> None:
        for _ in range(500):
            await shadow.predict(IMAGE, "http_json")
        await asyncio.sleep(0.3)

    asyncio.run(main())
    assert 0.13 < len(observed.pairs) / 500 < 0.27  # 20 % +- 7 points is 3.9 sigma
    shadow.close()


def test_a_failing_challenger_never_fails_an_answer():
    observed = Observed()
    shadow = rollout("shadow", challenger=StandIn("2", digit=2, fail=True), observer=observed)

    async def main() -> list[str]:
        answers = [(await shadow.predict(IMAGE, "http_json")).model.version for _ in range(5)]
        await asyncio.sleep(0.2)
        return answers

    assert asyncio.run(main()) == ["1"] * 5
    assert observed.pairs == [] and observed.dropped_images == 5  # its failures are counted as dropped copies
    shadow.close()
