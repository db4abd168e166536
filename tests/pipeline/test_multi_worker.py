"""Multi-worker training (``training.strategy=multi_worker``): the cluster from ``TF_CONFIG``, two real
worker processes on loopback, and a worker that dies."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import mlflow
import pytest

from harness.launcher import free_port
from pipeline.distributed import Cluster, cluster_from_env
from pipeline.errors import ConfigError
from tests.helpers import (
    PipelineProcess,
    assert_failed_and_nothing_registered,
    client_for,
    last_json_line,
    run_pipeline,
    seed_training,
    start_pipeline,
    store_env,
    wait_until,
)


def tf_config(workers: list[str], index: int, chief: list[str] | None = None, task_type: str = "worker") -> str:
    cluster = {"worker": workers, **({"chief": chief} if chief else {})}
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (tf_config(["a:1", "b:1"], 0), Cluster("worker", 0, 2)),
        (tf_config(["a:1", "b:1"], 1), Cluster("worker", 1, 2)),
        (tf_config(["b:1"], 0, chief=["a:1"], task_type="chief"), Cluster("chief", 0, 2, has_chief=True)),
    ],
)
def test_tf_config_places_the_task_in_its_cluster(value, expected):
    assert cluster_from_env({"TF_CONFIG": value}) == expected


def test_the_chief_is_the_chief_task_else_worker_zero():
    assert cluster_from_env({"TF_CONFIG": tf_config(["a:1", "b:1"], 0)}).is_chief
    assert not cluster_from_env({"TF_CONFIG": tf_config(["a:1", "b:1"], 1)}).is_chief
    assert not cluster_from_env({"TF_CONFIG": tf_config(["b:1"], 0, chief=["a:1"])}).is_chief
    assert cluster_from_env({"TF_CONFIG": tf_config(["b:1"], 0, chief=["a:1"], task_type="chief")}).is_chief


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "training.strategy=multi_worker needs TF_CONFIG"),
        ("{not json", "TF_CONFIG is not a cluster spec"),
        ('{"cluster": {"worker": ["a:1"]}}', "TF_CONFIG is not a cluster spec"),
        (tf_config(["a:1", "b:1"], 2), "task worker:2 is not in its cluster"),
        (tf_config(["a:1"], 0, task_type="ps"), "task type 'ps'"),
    ],
)
def test_a_missing_or_wrong_tf_config_is_a_config_error_naming_it(value, message):
    with pytest.raises(ConfigError, match=message):
        cluster_from_env({"TF_CONFIG": value})


def start_worker(args: list[str], env: dict[str, str], cwd: Path, log: Path) -> PipelineProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    return start_pipeline(args, env, cwd, log=log, new_session=True)


def start_cluster(
    tmp_path: Path, epochs: int, exports: Path | None = None
) -> tuple[list[PipelineProcess], list[Path], list[Path]]:
    """Chief (worker 0, in ``tmp_path/chief``) and worker 1 (in ``tmp_path/worker``, an empty directory),
    both pointed at the chief's store as a real deployment's would be."""
    workers = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    store = store_env(tmp_path / "chief")
    exports = exports or tmp_path / "chief" / "exports"
    args = seed_training(exports, "training.strategy=multi_worker", "registry.accuracy_floor=0", epochs=epochs)
    dirs = [tmp_path / "chief", tmp_path / "worker"]
    logs = [tmp_path / "chief.log", tmp_path / "worker.log"]
    procs = [start_worker(args, {**store, "TF_CONFIG": tf_config(workers, index)}, dirs[index], logs[index]) for index in (0, 1)]
    return procs, dirs, logs


def run_cluster(tmp_path: Path, epochs: int, exports: Path | None = None) -> tuple[list[int], list[Path], list[str]]:
    """Both tasks to the end: their exit codes, directories and outputs."""
    procs, dirs, logs = start_cluster(tmp_path, epochs, exports)
    try:
        for proc in procs:
            proc.wait(timeout=600)
    finally:
        stop_all(procs)
    return [proc.returncode for proc in procs], dirs, [log.read_text() for log in logs]


def stop_all(procs: list[PipelineProcess]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.mark.slow
def test_without_tf_config_multi_worker_training_stops_before_any_run(tmp_path):
    env = {**store_env(tmp_path), "TF_CONFIG": ""}
    proc = run_pipeline(seed_training(tmp_path / "exports", "training.strategy=multi_worker"), env, tmp_path)
    assert proc.returncode == 2
    assert "error: training.strategy=multi_worker needs TF_CONFIG" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "exports").exists()


@pytest.mark.slow
def test_two_workers_train_one_run_one_version_one_export(tmp_path):
    codes, dirs, (chief_out, worker_out) = run_cluster(tmp_path, epochs=2)
    assert codes == [0, 0], chief_out[-3000:] + worker_out[-3000:]

    result = last_json_line(chief_out)
    assert last_json_line(worker_out) == {"task": "worker:1", "role": "worker", "epochs_run": 2}
    assert "the chief's run finished" in worker_out  # it waited for the outcome...
    assert "unhealthy" not in chief_out and "stopped sending heartbeats" not in chief_out  # ...so the chief saw no loss
    # lockstep: both processes saw the same (all-reduced) metrics every epoch
    epoch_lines = [
        [line.split(" | ")[0] for line in out.splitlines() if line.startswith("epoch ")] for out in (chief_out, worker_out)
    ]
    assert len(epoch_lines[0]) == 2 and epoch_lines[0] == epoch_lines[1]

    client = client_for(store_env(dirs[0])["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["mnist"], output_format="list")
    assert [(run.info.run_id, run.info.status) for run in runs] == [(result["run_id"], "FINISHED")]
    assert runs[0].data.tags["replicas"] == "2"
    assert (runs[0].data.tags["cluster_tasks"], runs[0].data.tags["cluster_chief"]) == ("2", "worker:0")
    assert [str(version.version) for version in client.search_model_versions("name='mnist-cnn'")] == [result["model_version"]]
    assert sorted(path.name for path in (dirs[0] / "exports" / "mnist").iterdir()) == [result["model_version"]]
    assert list(dirs[1].iterdir()) == []  # the worker wrote nothing: no store, no export, no staging


@pytest.mark.slow
def test_a_killed_worker_fails_the_run_and_registers_nothing(tmp_path):
    procs, dirs, logs = start_cluster(tmp_path, epochs=60)
    chief, worker = procs
    try:
        wait_until(lambda: "epoch 2/" in logs[1].read_text() or chief.poll() is not None, timeout=300)
        assert "epoch 2/" in logs[1].read_text(), logs[0].read_text()[-3000:] + logs[1].read_text()[-3000:]
        os.killpg(worker.pid, signal.SIGKILL)
        chief.wait(timeout=180)
    finally:
        stop_all(procs)
    chief_out = logs[0].read_text()
    assert chief.returncode == 2, chief_out[-3000:]
    assert "error: training cluster: task worker:1 stopped during training" in chief_out
    assert "Traceback" not in chief_out
    assert_failed_and_nothing_registered(store_env(dirs[0]), dirs[0] / "exports")


@pytest.mark.slow
def test_a_chief_that_fails_after_training_fails_the_worker_too(tmp_path):
    blocker = tmp_path / "chief" / "exports"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where the export directory should go")
    codes, dirs, (chief_out, worker_out) = run_cluster(tmp_path, epochs=1, exports=blocker)
    assert codes == [2, 2], chief_out[-3000:] + worker_out[-3000:]
    assert "error: the chief's run failed after training, and nothing was registered" in worker_out
    assert "Traceback" not in chief_out + worker_out
    client = client_for(store_env(dirs[0])["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["mnist"], output_format="list")
    assert [run.info.status for run in runs] == ["FAILED"]
    assert client.search_model_versions("name='mnist-cnn'") == []
    assert list(dirs[1].iterdir()) == []
