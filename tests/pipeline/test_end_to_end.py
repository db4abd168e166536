"""The real job on the committed sample: train, track, export, register, gate — and fail cleanly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
import tensorflow as tf
from mlflow import MlflowClient

from contract import registry_uri
from harness.launcher import child_env, start_mlflow_models_serve, stop_process
from tests.helpers import (
    SAMPLE_NPZ,
    assert_failed_and_nothing_registered,
    client_for,
    last_json_line,
    run_pipeline,
    seed_training,
    store_env,
)

pytestmark = pytest.mark.slow

ARTIFACTS = {
    "plots/accuracy_curve.png",
    "plots/loss_curve.png",
    "plots/confusion_matrix.png",
    "plots/misclassified.png",
    "plots/feature_maps.png",
    "model_summary.txt",
    "classification_report.txt",
}


def all_artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= all_artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_train_prints_a_machine_readable_result(trained_registry):
    result = trained_registry.result
    assert set(result) == {"run_id", "model_version", "test_accuracy", "promoted", "export_path"}
    assert result["model_version"] == "1" and result["promoted"] is True
    assert f"run id: {result['run_id']}" in trained_registry.stdout
    assert re.search(r"^epoch 1/1: .*val_accuracy \d\.\d{4} .*s per epoch, .* elapsed, ETA 0s$", trained_registry.stdout, re.M), (
        "no per-epoch progress line"
    )
    assert re.search(r"^plan: train seed for up to 1 epochs on 1,400 images", trained_registry.stdout, re.M)


def test_export_serves_raw_uint8_pixels_through_its_signature(trained_registry, sample):
    export = trained_registry.export_path
    assert export.name == "1" and export.parent.name == "mnist" and (export / "saved_model.pb").is_file()
    assert not [p for p in export.parent.iterdir() if p.name.startswith(".staging")]
    serve = tf.saved_model.load(str(export)).signatures["serving_default"]
    out = serve(pixels=tf.constant(sample["x_test"]))
    probabilities, digits = out["probabilities"].numpy(), out["digit"].numpy()
    assert probabilities.shape == (500, 10) and probabilities.dtype == np.float32
    np.testing.assert_array_equal(digits, probabilities.argmax(axis=1))
    accuracy = float((digits == sample["y_test"]).mean())
    assert accuracy == pytest.approx(trained_registry.result["test_accuracy"], abs=1e-6)


def test_run_holds_params_metrics_artifacts_tags_and_dataset(trained_registry):
    client = client_for(trained_registry.tracking_uri)
    run = client.get_run(trained_registry.result["run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["training.epochs"] == "1" and params["model.rescale"] == "False"
    assert (params["data.source"], params["data.path"]) == ("npz", os.path.relpath(SAMPLE_NPZ, trained_registry.workdir)), (
        "params must say what data ran"
    )
    assert params["optimizer_name"], "MLflow's Keras callback logs the optimizer's settings"
    for metric in ("loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"):
        history = client.get_metric_history(run.info.run_id, metric)
        assert [m.step for m in history] == [0], metric
    batches = client.get_metric_history(run.info.run_id, "batch_loss")  # logged every 5 of the 11 batches
    assert [m.step for m in batches] == [5, 10]
    assert client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage"), "no system metrics"
    assert {f"test_{kind}_{digit}" for kind in ("precision", "recall", "f1") for digit in range(10)} <= set(run.data.metrics)
    assert run.data.metrics["test_accuracy"] == pytest.approx(trained_registry.result["test_accuracy"], abs=1e-6)
    assert ARTIFACTS <= all_artifacts(client, run.info.run_id)
    tags = run.data.tags
    assert (
        tags["data_source"] == f"npz:{os.path.relpath(SAMPLE_NPZ, trained_registry.workdir)}" and len(tags["data_digest"]) == 16
    )
    assert tags["export_path"] == "mnist/1", "the export, relative to the export base: no machine-local path"
    assert float(tags["training_wall_time_s"]) > 0 and re.fullmatch(r"[0-9a-f]{40}", tags["mlflow.source.git.commit"])
    assert tags["gate_decision"] == "promoted"
    assert not [key for key in tags if key.startswith("job.")], "liveness tags stay only while the run runs"
    note = tags["mlflow.note.content"]
    accuracy = trained_registry.result["test_accuracy"]
    assert f"{accuracy:.4f}" in note and "mnist-cnn version 1" in note and "promoted to `champion`" in note
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's training mode
    assert "python -m pipeline train" in experiment.tags["mlflow.note.content"]
    contexts = {d.tags[0].value for d in run.inputs.dataset_inputs}
    assert contexts == {"training", "testing"}
    assert all(tags["data_digest"] in d.dataset.name for d in run.inputs.dataset_inputs)


def test_registered_version_is_a_keras_mlflow_model_carrying_the_savedmodel(trained_registry, sample, tmp_path):
    client = client_for(trained_registry.tracking_uri)
    assert str(client.get_model_version_by_alias("mnist-cnn", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("mnist-cnn", "challenger").version) == "1"
    model_dir = Path(mlflow.artifacts.download_artifacts("models:/mnist-cnn@champion", dst_path=str(tmp_path)))
    info = mlflow.models.Model.load(str(model_dir / "MLmodel"))
    assert "keras" in info.flavors and info.signature is not None
    version = client.get_model_version("mnist-cnn", "1")
    assert trained_registry.result["run_id"] in version.description and "gate: promoted" in version.description
    assert "serving_default" in client.get_registered_model("mnist-cnn").description
    pyfunc = mlflow.pyfunc.load_model("models:/mnist-cnn@champion")
    via_pyfunc = np.asarray(pyfunc.predict(sample["x_test"][:16].astype(np.float32)[..., None]))
    serve = tf.saved_model.load(str(model_dir / "saved_model")).signatures["serving_default"]
    via_saved_model = serve(pixels=tf.constant(sample["x_test"][:16]))["probabilities"].numpy()
    np.testing.assert_allclose(via_pyfunc, via_saved_model, atol=1e-5)


def test_gate_keeps_champion_then_evaluate_and_promote_by_hand(trained_registry, tmp_path):
    registry = trained_registry.copy(tmp_path / "store")  # this test moves the champion
    env, cwd = registry.env, registry.workdir
    proc = run_pipeline(
        seed_training(cwd / "exports", "registry.accuracy_floor=0.999"),
        env,
        cwd,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "already exists" not in proc.stderr, "MLflow's registration notice is noise to a trainer"
    second = last_json_line(proc.stdout)
    assert second["model_version"] == "2" and second["promoted"] is False
    assert Path(second["export_path"]).name == "2"
    client = client_for(registry.tracking_uri)
    assert str(client.get_model_version_by_alias("mnist-cnn", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("mnist-cnn", "challenger").version) == "2"
    run = client.get_run(second["run_id"])
    assert run.data.tags["gate_decision"] == "not promoted" and "floor" in run.data.tags["gate_reason"]
    assert "not promoted (`champion` stays on version 1)" in run.data.tags["mlflow.note.content"]
    assert run.data.metrics["gate_champion_accuracy"] == pytest.approx(trained_registry.result["test_accuracy"], abs=1e-6)

    evaluated = run_pipeline(["evaluate", "--model", "2", "--data", str(SAMPLE_NPZ)], env, cwd)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert last_json_line(evaluated.stdout)["accuracy"] == pytest.approx(second["test_accuracy"], abs=1e-6)

    promoted = run_pipeline(["promote", "2"], env, cwd)
    assert promoted.returncode == 0, promoted.stderr[-2000:]
    assert str(client.get_model_version_by_alias("mnist-cnn", "champion").version) == "2"
    missing = run_pipeline(["promote", "99"], env, cwd)
    assert missing.returncode == 2 and "error" in missing.stderr and "Traceback" not in missing.stderr
    assert str(client.get_model_version_by_alias("mnist-cnn", "champion").version) == "2"


def test_bad_data_fails_the_run_with_a_clear_error(tmp_path):
    env = store_env(tmp_path)
    proc = run_pipeline(
        seed_training(tmp_path / "exports", data=str(tmp_path / "missing.npz")),
        env,
        tmp_path,
    )
    assert proc.returncode == 2
    assert "data file or directory not found" in proc.stderr and "Traceback" not in proc.stderr
    assert_failed_and_nothing_registered(env, tmp_path / "exports")


def test_failure_at_export_leaves_no_export_and_registers_nothing(tmp_path):
    env = store_env(tmp_path)
    blocker = tmp_path / "exports"
    blocker.write_text("a file where the export directory should go")
    proc = run_pipeline(
        seed_training(blocker),
        env,
        tmp_path,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(blocker) in proc.stderr
    assert_failed_and_nothing_registered(env, tmp_path)
    assert blocker.is_file()


def test_ctrl_c_marks_the_run_failed(tmp_path):
    env = child_env(store_env(tmp_path))
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "pipeline", *seed_training(tmp_path / "exports", epochs=200)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a shell's background job or nohup starts us with SIGINT ignored, and the child would inherit that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 180
    for line in proc.stdout:
        if line.startswith("epoch 1/") or time.monotonic() > deadline:  # training is under way
            break
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr
    assert_failed_and_nothing_registered(store_env(tmp_path), tmp_path / "exports")


def test_mirrored_strategy_trains_on_two_logical_cpus(tmp_path):
    proc = run_pipeline(
        seed_training(tmp_path / "exports", "training.strategy=mirrored", "training.logical_cpus=2", "registry.accuracy_floor=0"),
        store_env(tmp_path),
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 replica(s)" in proc.stdout
    assert last_json_line(proc.stdout)["model_version"] == "1"


def test_mlflow_models_serve_answers_with_the_champion(trained_registry, sample, tmp_path):
    server = start_mlflow_models_serve(
        registry_uri(), tmp_path / "mlflow-serve.log", trained_registry.env, trained_registry.workdir
    )
    try:
        assert server.process.poll() is None, server.log()[-2000:]
        images = sample["x_test"][:8]
        answer = requests.post(f"{server.url}/invocations", json={"inputs": images[..., None].astype(float).tolist()}, timeout=60)
        assert answer.status_code == 200, answer.text
        predictions = np.asarray(answer.json()["predictions"])
        serve = tf.saved_model.load(str(trained_registry.export_path)).signatures["serving_default"]
        expected = serve(pixels=tf.constant(images))["probabilities"].numpy()
        np.testing.assert_allclose(predictions, expected, atol=1e-5)
    finally:
        stop_process(server)
