"""BentoML's own clients against the real service: ``/schema.json`` describes ``predict``, and
``SyncHTTPClient``/``AsyncHTTPClient`` call it (the hot path answers, with the SavedModel's digits)."""

from __future__ import annotations

import asyncio

import bentoml
import pytest
import requests

from tests.helpers import assert_same_answers
from tests.service.helpers import saved_model_probabilities, served_version

pytestmark = pytest.mark.slow


def test_schema_json_describes_the_predict_api(service):
    schema = requests.get(f"{service.url}/schema.json", timeout=10)
    assert schema.status_code == 200
    (predict,) = [route for route in schema.json()["routes"] if route["name"] == "predict"]
    assert predict["route"] == "/predict"


def test_sync_client_gets_the_savedmodels_answers(service, trained_registry, sample):
    images = sample["x_test"][:3]
    expected = saved_model_probabilities(trained_registry, served_version(service), images)
    with bentoml.SyncHTTPClient(service.url) as client:
        answers = client.predict(images.tolist())
        one = client.predict(images[0].tolist())
    assert [a["digit"] for a in answers] == expected.argmax(1).tolist()
    assert_same_answers([a["probabilities"] for a in answers], expected)
    assert all(a["model_version"] == served_version(service) for a in answers)
    assert [a["digit"] for a in one] == expected.argmax(1).tolist()[:1]


def test_async_client_gets_answers_and_a_clear_error(service, sample):
    async def call() -> tuple[list, Exception]:
        async with bentoml.AsyncHTTPClient(service.url) as client:
            answers = await client.predict(sample["x_test"][:2].tolist())
            try:
                await client.predict([[300] * 28] * 28)
            except Exception as exc:  # BentoML raises its own error type for a 4xx answer
                return answers, exc
        raise AssertionError("a pixel of 300 was accepted")

    answers, error = asyncio.run(call())
    assert len(answers) == 2 and all(a["digit"] in range(10) for a in answers)
    assert "0-255" in str(error)
