"""Users' corrections into training: records the service writes (its real FeedbackStore) read back,
summarised and exported for review; `train --feedback` adds them to the training split only, logged as
their own MLflow dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline import feedback
from pipeline.errors import DataError
from service.feedback import FeedbackStore
from tests.helpers import client_for, last_json_line, run_pipeline, seed_training


@pytest.fixture
def store(tmp_path, sample):
    """Six verdicts as the service stores them: version 3 right twice of four, version 4 right twice of two."""
    writer = FeedbackStore(tmp_path / "feedback")
    verdicts = [("3", 1, 1), ("3", 2, 7), ("3", 4, 4), ("3", 5, 6), ("4", 7, 7), ("4", 9, 9)]
    for i, (version, predicted, label) in enumerate(verdicts):
        writer.add(f"10.0.0.{i}", sample["x_test"][i], predicted, label, version)
    return tmp_path / "feedback"


def test_stats_give_the_online_accuracy_per_version(store):
    summary = feedback.stats(feedback.read_records(store))
    assert summary["records"] == 6
    assert summary["versions"]["3"] == {"verdicts": 4, "right": 2, "online_accuracy": 0.5}
    assert summary["versions"]["4"] == {"verdicts": 2, "right": 2, "online_accuracy": 1.0}
    assert summary["labels"] == {1: 1, 4: 1, 6: 1, 7: 2, 9: 1}


def test_export_keeps_the_images_and_the_users_labels(store, sample, tmp_path):
    out = tmp_path / "reviewed.npz"
    assert feedback.export(feedback.read_records(store), out) == 6
    x, y = feedback.load_reviewed(out)
    np.testing.assert_array_equal(x, sample["x_test"][:6])
    assert y.tolist() == [1, 7, 4, 6, 7, 9]


def test_a_torn_last_line_is_skipped_and_bad_exports_are_data_errors(store, tmp_path):
    (path,) = store.glob("feedback-*.jsonl")
    with path.open("ab") as file:
        file.write(b'{"time": "2026-12-01T00:00:00+00:00", "model_ver')  # the service stopped mid-write
    assert len(feedback.read_records(store)) == 6
    with pytest.raises(DataError, match="no feedback directory"):
        feedback.read_records(tmp_path / "nowhere")
    np.savez(tmp_path / "wrong.npz", x_train=np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(DataError, match="not a feedback export"):
        feedback.load_reviewed(tmp_path / "wrong.npz")


@pytest.mark.slow
def test_train_with_feedback_adds_it_to_the_training_split_only_and_logs_it(store, trained_registry, tmp_path):
    registry = trained_registry.copy(tmp_path / "registry")
    env, cwd = registry.env, registry.workdir
    stats = run_pipeline(["feedback", "stats", str(store)], env, cwd)
    assert stats.returncode == 0 and json.loads(stats.stdout)["records"] == 6, stats.stderr[-2000:]
    exported = run_pipeline(["feedback", "export", str(store), "--out", str(tmp_path / "reviewed.npz")], env, cwd)
    assert exported.returncode == 0 and "exported 6 feedback examples" in exported.stdout, exported.stderr[-2000:]

    proc = run_pipeline([*seed_training(cwd / "exports"), "--feedback", str(tmp_path / "reviewed.npz")], env, cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "feedback: 6 reviewed examples" in proc.stdout
    client = client_for(registry.tracking_uri)
    run = client.get_run(last_json_line(proc.stdout)["run_id"])
    assert run.data.params["feedback.examples"] == "6"
    inputs = {d.tags[0].value: d.dataset for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "testing", "training-feedback"}
    assert inputs["training-feedback"].name.startswith("feedback-")
    first = client.get_run(trained_registry.result["run_id"])
    first_inputs = {d.tags[0].value: d.dataset for d in first.inputs.dataset_inputs}
    assert inputs["testing"].digest == first_inputs["testing"].digest  # the gate's test set is untouched


@pytest.mark.slow
def test_train_with_a_missing_feedback_file_fails_before_any_run(trained_registry, tmp_path):
    registry = trained_registry.copy(tmp_path / "registry")
    proc = run_pipeline(
        [*seed_training(registry.workdir / "exports"), "--feedback", str(tmp_path / "none.npz")], registry.env, registry.workdir
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: --feedback") and "Traceback" not in proc.stderr
    client = client_for(registry.tracking_uri)
    assert len(client.search_model_versions("name='mnist-cnn'")) == 1  # nothing new registered
