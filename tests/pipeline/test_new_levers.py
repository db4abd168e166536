"""The champion's levers end to end on the committed sample: a strided, batch-normalized, elastically
augmented student distilled from the registered champion is trained for an epoch, exported with its
batch norm folded, registered, and served by the service's runtime."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
import tensorflow as tf

from contract import SIGNATURE
from service.runtime import ModelRuntime
from tests.helpers import assert_same_answers, last_json_line, run_pipeline, seed_training

pytestmark = pytest.mark.slow

STUDENT = [
    "model.rescale=true",
    "model.batch_norm=true",
    "model.conv_blocks=[{filters: 8, kernel_size: 5, strides: 2, pool: false}, {filters: 16}]",
    "model.augmentation={rotation: 0.02, elastic: {alpha: 12, sigma: 4}}",
    "training.optimizer=adam",
    "training.teacher=champion",
    "training.distill_temperature=2",
    "training.distill_weight=0.7",
    "registry.accuracy_floor=0",
]


def test_a_distilled_strided_elastic_student_trains_exports_folded_and_serves(trained_registry, sample, tmp_path):
    registry = trained_registry.copy(tmp_path / "store")
    proc = run_pipeline(seed_training(registry.workdir / "exports", *STUDENT), registry.env, registry.workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distillation: targets are 0.7 x teacher mnist-cnn version 1 (champion) at temperature 2" in proc.stdout
    result = last_json_line(proc.stdout)
    assert result["model_version"] == "2"

    mlflow.set_tracking_uri(registry.tracking_uri)
    run = mlflow.get_run(result["run_id"])
    assert run.data.tags["distill_teacher"] == "mnist-cnn/1" and run.data.params["training.teacher"] == "champion"
    assert float(run.data.params["model.augmentation.elastic.alpha"]) == 12

    graph = tf.saved_model.load(result["export_path"]).signatures[SIGNATURE.name].graph.as_graph_def()
    ops = {node.op for function in graph.library.function for node in function.node_def}
    assert "FusedBatchNormV3" not in ops and "Conv2D" in ops  # folded: convs only

    runtime = ModelRuntime(f"models:/mnist-cnn/{result['model_version']}", registry.tracking_uri)
    try:
        assert runtime.start().version == "2"
        served = runtime.predict(sample["x_test"][:64])
    finally:
        runtime.stop()
    exported = tf.saved_model.load(result["export_path"]).signatures[SIGNATURE.name]
    expected = exported(**{SIGNATURE.input: tf.constant(sample["x_test"][:64])})[SIGNATURE.probabilities].numpy()
    assert_same_answers(served.probabilities, expected)
    assert np.isfinite(served.probabilities).all()


def test_a_teacher_that_does_not_exist_fails_before_training_naming_it(trained_registry, tmp_path):
    registry = trained_registry.copy(tmp_path / "store")
    proc = run_pipeline(
        seed_training(registry.workdir / "exports", "training.teacher=nonexistent-alias"), registry.env, registry.workdir
    )
    assert proc.returncode == 2 and "training.teacher 'nonexistent-alias'" in proc.stderr and "Traceback" not in proc.stderr
