"""Stopping and killing the training job at each step, then ``recover``: the store is always left
consistent — the whole result (version, export, alias decision, FINISHED run) or none of it."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from tests.helpers import PipelineProcess, last_json_line, run_pipeline, seed_training, start_pipeline

pytestmark = pytest.mark.slow
NAME = "mnist-cnn"


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> Path:
    """A store whose champion is version 1 (trained once, copied for each test)."""
    root = tmp_path_factory.mktemp("seeded")
    trained = run_pipeline(_train_args(root), _env(root), root)
    assert trained.returncode == 0, trained.stderr[-3000:]
    return root


@pytest.fixture
def store(seeded, tmp_path) -> Path:
    shutil.copy(seeded / "mlflow.db", tmp_path / "mlflow.db")
    shutil.copytree(seeded / "exports", tmp_path / "exports")
    return tmp_path


def _env(root: Path, **extra: str) -> dict[str, str]:
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", **extra}


def _train_args(root: Path, *sets: str) -> list[str]:
    return seed_training(root / "exports", "registry.accuracy_floor=0.1", *sets)


def _start(root: Path, pause_at: str | None, *sets: str) -> PipelineProcess:
    extra = {"PIPELINE_PAUSE_AT": pause_at, "PIPELINE_PAUSE_S": "3"} if pause_at else {}
    return start_pipeline(_train_args(root, *sets), _env(root, **extra), root)


def _wait_for(process: PipelineProcess, line_start: str, timeout: float = 240) -> list[str]:
    seen, deadline = [], time.monotonic() + timeout
    for line in process.stdout:
        seen.append(line)
        if line.startswith(line_start):
            return seen
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"never saw {line_start!r}:\n{''.join(seen)[-2000:]}")


def _state(root: Path) -> dict:
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    runs = mlflow.search_runs(experiment_names=["mnist"], output_format="list")
    versions = {str(v.version): client.get_run(v.run_id).info.status for v in client.search_model_versions(f"name='{NAME}'")}
    try:
        champion = str(client.get_model_version_by_alias(NAME, "champion").version)
    except mlflow.exceptions.MlflowException:
        champion = None
    servable = root / "exports" / "mnist"
    return {
        "statuses": sorted(run.info.status for run in runs),
        "versions": versions,
        "champion": champion,
        "exports": sorted(p.name for p in servable.iterdir() if not p.name.startswith(".")),
        "staging": sorted(p.name for p in servable.iterdir() if p.name.startswith(".staging")),
        "locks": [m.name for m in client.search_registered_models() if m.name.endswith("--gate-lock")],
        "liveness": sorted(key for run in runs if run.info.status == "FAILED" for key in run.data.tags if key.startswith("job.")),
    }


def _assert_consistent(state: dict) -> None:
    assert "RUNNING" not in state["statuses"], state
    assert set(state["versions"].values()) <= {"FINISHED"}, state  # no version without a finished run
    assert state["exports"] == sorted(state["versions"]), state  # one export per version, no orphan
    assert state["staging"] == [] and state["locks"] == [], state
    assert state["liveness"] == [], state  # a failed run (by the job or by recover) keeps no host, pid or heartbeat
    assert state["champion"] in state["versions"], state


@pytest.mark.parametrize(("sig", "step"), [(signal.SIGTERM, "export"), (signal.SIGINT, "export"), (signal.SIGTERM, "evaluate")])
def test_a_stop_before_the_commit_fails_the_run_and_registers_nothing(store, sig, step):
    process = _start(store, step)
    _wait_for(process, f"step: {step}")
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == (143 if sig == signal.SIGTERM else 130), stderr[-2000:]
    assert f"interrupted (stopped by {sig.name})" in stderr and "nothing was registered" in stderr
    assert "Traceback" not in stderr
    state = _state(store)
    _assert_consistent(state)
    assert state["statuses"] == ["FAILED", "FINISHED"] and list(state["versions"]) == ["1"] and state["champion"] == "1"


def test_sigterm_during_fit_stops_after_the_batch_and_fails_the_run(store):
    process = _start(store, None, "epochs=200")
    _wait_for(process, "epoch 1/")  # the end of epoch 1: training is under way
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-2000:]
    state = _state(store)
    _assert_consistent(state)
    assert state["statuses"] == ["FAILED", "FINISHED"] and list(state["versions"]) == ["1"]


@pytest.mark.parametrize(
    ("sig", "step"),
    [(signal.SIGTERM, "register"), (signal.SIGTERM, "publish"), (signal.SIGTERM, "gate"), (signal.SIGINT, "gate")],
)
def test_a_stop_during_the_commit_completes_it_and_says_so(store, sig, step):
    process = _start(store, step)
    _wait_for(process, f"step: {step}")
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    assert f"{sig.name} arrived during the commit, too late to undo it: version 2 is complete" in stdout
    state = _state(store)
    _assert_consistent(state)
    assert state["statuses"] == ["FINISHED", "FINISHED"] and sorted(state["versions"]) == ["1", "2"]
    assert state["champion"] == ("2" if last_json_line(stdout)["promoted"] else "1")


@pytest.mark.parametrize("step", ["train", "export", "register", "publish", "gate"])
def test_kill_9_at_each_step_then_recover_leaves_no_trace(store, step):
    process = _start(store, step, "epochs=2")
    _wait_for(process, f"step: {step}")
    time.sleep(0.5)
    process.kill()
    process.communicate(timeout=60)
    before = _state(store)
    assert "RUNNING" in before["statuses"]  # what a crash leaves

    recovered = run_pipeline(["recover", "--config", "seed"], _env(store), store)
    assert recovered.returncode == 0, recovered.stderr[-2000:]
    assert "was RUNNING but its process" in recovered.stdout and "marked FAILED" in recovered.stdout
    state = _state(store)
    _assert_consistent(state)
    assert list(state["versions"]) == ["1"] and state["champion"] == "1" and state["statuses"] == ["FAILED", "FINISHED"]
    again = run_pipeline(["recover", "--config", "seed"], _env(store), store)
    assert "recover: nothing to do" in again.stdout


def _kill_at(root: Path, step: str, *sets: str) -> dict:
    process = _start(root, step, *sets)
    _wait_for(process, f"step: {step}")
    time.sleep(0.5)
    process.kill()
    process.communicate(timeout=60)
    return _state(root)


def test_kill_9_after_the_alias_moved_before_the_run_finished_then_recover_restores_the_champion(store):
    """The window between the alias moving and the run finishing: recover fails the run, deletes the
    version and puts ``champion`` back on the version it replaced (it used to leave no champion)."""
    before = _kill_at(store, "finish", "epochs=3")
    assert before["champion"] == "2" and "RUNNING" in before["statuses"], before  # promoted, not finished

    recovered = run_pipeline(["recover", "--config", "seed"], _env(store), store)
    assert recovered.returncode == 0, recovered.stderr[-2000:]
    assert "champion back to version 1" in recovered.stdout, recovered.stdout
    state = _state(store)
    _assert_consistent(state)
    assert list(state["versions"]) == ["1"] and state["champion"] == "1" and state["statuses"] == ["FAILED", "FINISHED"]


def test_kill_9_while_holding_the_gate_lock_then_recover_breaks_the_lock_at_once(store):
    before = _kill_at(store, "promote", "epochs=3")
    assert before["locks"] == ["mnist-cnn--gate-lock"] and before["champion"] == "1", before

    recovered = run_pipeline(["recover", "--config", "seed"], _env(store), store)
    assert recovered.returncode == 0, recovered.stderr[-2000:]
    assert "broke the gate lock of mnist-cnn left by" in recovered.stdout, recovered.stdout
    state = _state(store)
    _assert_consistent(state)
    assert list(state["versions"]) == ["1"] and state["champion"] == "1"

    trained = run_pipeline(_train_args(store, "epochs=3"), _env(store), store)  # the gate is free again
    assert trained.returncode == 0, trained.stderr[-2000:]
    _assert_consistent(_state(store))


def test_kill_9_after_promotion_then_train_restores_the_previous_champion(store):
    """Killed after moving the alias but before finishing the run: the next train's recover undoes it."""
    process = _start(store, None, "epochs=3")
    _wait_for(process, "gate: PROMOTED")
    process.kill()  # the run may or may not have finished; either way the store must end consistent
    process.communicate(timeout=60)
    trained = run_pipeline(_train_args(store), _env(store), store)
    assert trained.returncode == 0, trained.stderr[-2000:]
    _assert_consistent(_state(store))


def test_two_trainings_at_once_on_a_new_store_both_succeed_and_the_better_is_champion(tmp_path):
    """Both reach the gate together (paused there); the gate lock makes the decision a compare-and-set."""
    first = _start(tmp_path, "gate", "epochs=1")
    second = _start(tmp_path, "gate", "epochs=4")
    results = []
    for process in (first, second):
        stdout, stderr = process.communicate(timeout=400)
        assert process.returncode == 0, stderr[-3000:]
        assert "Traceback" not in stderr
        results.append(last_json_line(stdout))
    state = _state(tmp_path)
    _assert_consistent(state)
    best = max(results, key=lambda r: (r["test_accuracy"], -int(r["model_version"])))
    assert state["champion"] == best["model_version"], (results, state)
