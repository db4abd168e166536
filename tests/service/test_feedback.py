"""Corrections from users: POST /feedback stored durably (what the pipeline reads back), bounded per
client and in size, off by default; the drawing page's verdict buttons in a real browser."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
import requests

from harness.launcher import start_service, stop_service
from pipeline.feedback import read_records
from service.errors import InputError
from service.feedback import FeedbackStore, FeedbackStoreFull, TooManyFeedbacks, parse_feedback
from tests.service.helpers import metric_samples, served_version


def test_a_record_is_stored_whole_and_read_back_by_the_pipeline(tmp_path, sample):
    store = FeedbackStore(tmp_path)
    image = sample["x_test"][0]
    store.add("10.0.0.1", image, predicted=3, label=5, version="4")
    (record,) = read_records(tmp_path)
    np.testing.assert_array_equal(record["pixels"], image)
    assert (record["predicted"], record["label"], record["model_version"]) == (3, 5, "4") and record["time"]


def test_each_client_is_limited_per_minute_and_the_store_in_size(tmp_path):
    store = FeedbackStore(tmp_path / "a", per_minute=2)
    image = np.zeros((28, 28), np.uint8)
    store.add("10.0.0.1", image, 1, 1, "4")
    store.add("10.0.0.1", image, 1, 1, "4")
    with pytest.raises(TooManyFeedbacks, match="at most 2"):
        store.add("10.0.0.1", image, 1, 1, "4")
    store.add("10.0.0.2", image, 1, 1, "4")  # another client is not affected
    small = FeedbackStore(tmp_path / "b", max_bytes=1500)
    small.add("10.0.0.1", image, 1, 1, "4")
    with pytest.raises(FeedbackStoreFull):
        small.add("10.0.0.1", image, 1, 1, "4")
    assert len(read_records(tmp_path / "b")) == 1


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([1], "JSON object"),
        ({"pixels": [[0] * 28] * 28, "predicted": 3, "label": 3}, "missing model_version"),
        ({"pixels": [[0] * 28] * 28, "predicted": 3, "label": 10, "model_version": "4"}, "label must be a digit"),
        ({"pixels": [[0] * 28] * 27, "predicted": 3, "label": 3, "model_version": "4"}, "shape [27, 28]"),
        ({"pixels": [[300] * 28] * 28, "predicted": 3, "label": 3, "model_version": "4"}, "0-255"),
    ],
)
def test_bad_feedback_is_an_input_error_naming_the_problem(value, message):
    with pytest.raises(InputError) as raised:
        parse_feedback(value)
    assert message in str(raised.value)


@pytest.mark.slow
def test_feedback_is_off_by_default(service):
    answer = requests.post(f"{service.url}/feedback", json={}, timeout=10)
    assert answer.status_code == 404 and "FEEDBACK=on" in answer.json()["error"]


@pytest.fixture(scope="module")
def feedback_service(trained_registry, tmp_path_factory):
    directory = tmp_path_factory.mktemp("feedback")
    env = {**trained_registry.env, "FEEDBACK": "on", "FEEDBACK_DIR": str(directory / "store"), "FEEDBACK_PER_MINUTE": "5"}
    running = start_service(env, directory / "service.log")
    assert running.process.poll() is None, running.log()[-3000:]
    yield running, directory / "store"
    stop_service(running)


@pytest.mark.slow
def test_the_drawing_pages_verdict_reaches_the_store(feedback_service, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("no Chromium on this machine (Debian package `chromium`; .ci/run installs it)")
    service, store = feedback_service
    before = len(read_records(store))
    dom = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={tmp_path}",
            "--virtual-time-budget=20000",
            "--dump-dom",
            f"{service.url}/draw#example&label=7",  # draws a 7, predicts, then says "it was a 7"
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert re.search(r'id="thanks"[^>]*>Thanks: noted as a 7\.<', dom), dom[-2000:]
    records = read_records(store)
    assert len(records) == before + 1
    assert records[-1]["label"] == 7 and records[-1]["model_version"] == served_version(service)
    assert records[-1]["pixels"].max() > 0  # the 28x28 the model saw, not a blank


@pytest.mark.slow
def test_posted_feedback_is_stored_counted_and_limited(feedback_service, sample):
    service, store = feedback_service
    version = served_version(service)
    image = sample["x_test"][1]
    body = {"pixels": image.tolist(), "predicted": 2, "label": 7, "model_version": version}
    answer = requests.post(f"{service.url}/feedback", json=body, timeout=10)
    assert answer.status_code == 201 and answer.json() == {"stored": True, "right": False}
    assert requests.post(f"{service.url}/feedback", json={**body, "label": 2}, timeout=10).json()["right"] is True
    records = read_records(store)
    assert [(r["predicted"], r["label"]) for r in records[-2:]] == [(2, 7), (2, 2)]
    np.testing.assert_array_equal(records[-1]["pixels"], image)
    verdicts = {s.labels["verdict"]: s.value for s in metric_samples(service) if s.name == "digits_feedback_total"}
    assert verdicts["right"] >= 1 and verdicts["wrong"] >= 1
    stored = len(read_records(store))
    bad = requests.post(f"{service.url}/feedback", json={**body, "label": "seven"}, timeout=10)
    assert bad.status_code == 400 and "label must be a digit" in bad.json()["error"]
    malformed = requests.post(f"{service.url}/feedback", data=b"{", headers={"Content-Type": "application/json"}, timeout=10)
    assert malformed.status_code == 400 and "malformed JSON" in malformed.json()["error"]
    assert len(read_records(store)) == stored  # nothing stored for a bad body
    statuses = [requests.post(f"{service.url}/feedback", json=body, timeout=10).status_code for _ in range(5)]
    assert statuses.count(429) >= 2  # 5 a minute per client: 2 (3 with the browser's) already used
