"""How a worker runs the model: thread pools for its share of the cores, and bfloat16 only where it
agrees with fp32 (service.compute), on a real exported model, in-process."""

from __future__ import annotations

import logging

import keras
import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.export import export_to_staging
from pipeline.model import build_model, compile_model, model_input
from service import compute
from service.runtime import ModelRuntime


@pytest.mark.parametrize(
    ("cores", "overrides", "expected"),
    [(2, {}, (2, 1)), (16, {}, (16, 1)), (0, {}, (1, 1)), (2, {"intra": 1, "inter": 2}, (1, 2))],
)
def test_a_worker_takes_the_cores_for_one_op_and_one_inter_op_thread(cores, overrides, expected):
    assert compute.thread_counts(cores, **overrides) == expected


def test_bf16_units_are_read_from_the_cpu_flags(tmp_path):
    with_units, without = tmp_path / "with", tmp_path / "without"
    with_units.write_text("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n")
    without.write_text("flags\t\t: fpu sse2 avx2 avx512f avx512bw\n")
    assert compute.cpu_has_bf16(with_units) and not compute.cpu_has_bf16(without)
    assert not compute.cpu_has_bf16(tmp_path / "missing")


@pytest.fixture(scope="module")
def export(sample, tmp_path_factory):
    """A small model trained on the sample, exported as the pipeline does (trained enough that no
    calibration digit is a near tie that bfloat16 rounding could flip)."""
    cfg = load_config("seed", ["model.rescale=true", "training.optimizer=adam"])
    keras.utils.set_random_seed(0)
    model = build_model(cfg.model)
    compile_model(model, cfg.training, steps_per_epoch=16)
    model.fit(model_input(sample["x_train"]), keras.utils.to_categorical(sample["y_train"], 10), epochs=6, verbose=0)
    return export_to_staging(model, tmp_path_factory.mktemp("export"))


@pytest.fixture
def runtime_for(export):
    runtimes = []

    def start(precision: str) -> ModelRuntime:
        runtime = ModelRuntime(str(export), "sqlite:///unused.db", precision=precision)
        runtime.start()
        runtimes.append(runtime)
        return runtime

    yield start
    for runtime in runtimes:
        runtime.stop()
    compute.set_bf16(False)  # the option is process-wide: leave fp32 to the other tests


def test_fp32_is_the_default_and_answers_as_the_export(runtime_for, sample):
    runtime = runtime_for("fp32")
    assert runtime.current.info.precision == "fp32" and runtime.precision_reason == "MODEL_PRECISION=fp32"


@pytest.mark.parametrize("requested", ["bf16", "auto"])
def test_without_bf16_units_the_worker_falls_back_to_fp32_and_says_why(runtime_for, requested, tmp_path, monkeypatch, caplog):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu sse2 avx2\n")
    monkeypatch.setattr(compute, "CPUINFO", cpuinfo)  # a CPU without bfloat16 units
    with caplog.at_level(logging.WARNING, logger="digits.runtime"):
        runtime = runtime_for(requested)
    assert runtime.current.info.precision == "fp32"
    (line,) = [record.getMessage() for record in caplog.records if "runs in fp32" in record.getMessage()]
    assert f"MODEL_PRECISION={requested}, but this CPU has no bfloat16 units" in line


@pytest.mark.skipif(not compute.cpu_has_bf16(), reason="this CPU has no bfloat16 units")
def test_auto_on_a_cpu_with_bf16_units_runs_bf16_with_the_same_digits(runtime_for, sample):
    fp32 = runtime_for("fp32").predict(sample["x_test"])
    runtime = runtime_for("auto")
    assert runtime.current.info.precision == "bf16" and "agrees with fp32" in runtime.precision_reason
    bf16 = runtime.predict(sample["x_test"])
    assert (bf16.digits == fp32.digits).mean() > 0.99
    np.testing.assert_allclose(bf16.probabilities, fp32.probabilities, atol=0.05)


@pytest.mark.skipif(not compute.cpu_has_bf16(), reason="this CPU has no bfloat16 units")
def test_a_model_whose_bf16_answers_disagree_stays_fp32(runtime_for):
    """The agreement check itself: with a tolerance no bfloat16 result meets, fp32 is kept."""
    loaded = runtime_for("fp32").current
    precision, reason = compute.choose_precision("bf16", lambda pixels: loaded.predict(pixels)[0], tolerance=1e-9)
    assert precision == "fp32" and "disagrees with fp32 on the calibration digits" in reason
