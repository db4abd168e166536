"""``python -m pipeline tune`` for real, on the committed sample with tiny budgets: studies, pruning, MLflow
nested runs, a study shared by two processes through PostgreSQL, resuming after Ctrl-C, promote-best."""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow import MlflowClient

from pipeline.config import load_config
from tests.helpers import FIXTURES, SAMPLE_NPZ, run_pipeline, start_pipeline, store_env

pytestmark = pytest.mark.slow

SPACE = FIXTURES / "search-tiny.yaml"
# seed 2 draws a learning rate that trains first and one that cannot second (the sampler is seeded),
# so the pruner has a completed trial to compare the hopeless one with
SEED = "2"


def tune_args(*extra: str, trials: int = 4, epochs: int = 2) -> list[str]:
    return [
        "tune", "--space", str(SPACE), "--trials", str(trials), "--data", str(SAMPLE_NPZ), "--seed", SEED,
        "--set", f"epochs={epochs}", "--set", "model.rescale=true", "--set", "training.optimizer=adam", *extra,
    ]  # fmt: skip


def optuna_study(workdir: Path, name: str = "search-tiny", storage: str | None = None) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage or f"sqlite:///{workdir / 'optuna.db'}")


@dataclass
class Tuned:
    workdir: Path
    stdout: str
    parent: mlflow.entities.Run
    children: list[mlflow.entities.Run]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory) -> Tuned:
    workdir = tmp_path_factory.mktemp("tune")
    proc = run_pipeline(tune_args(), store_env(workdir), workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mlflow.set_tracking_uri(store_env(workdir)["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["mnist"], output_format="list")
    (parent,) = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    children = sorted((run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                      key=lambda run: int(run.data.tags["tune.trial"]))  # fmt: skip
    return Tuned(workdir, proc.stdout, parent, children)


def test_a_study_logs_a_parent_run_and_one_nested_run_per_trial(tuned):
    assert len(tuned.children) == 4 and [c.info.run_name for c in tuned.children] == [f"trial {n}" for n in range(4)]
    client = MlflowClient()
    for child in tuned.children:
        params, metrics, state = child.data.params, child.data.metrics, child.data.tags["trial_state"]
        assert params["training.epochs"] == "2" and params["model.rescale"] == "True"  # --set holds for every trial
        assert "search.training.learning_rate" in params and "search.model.conv_blocks.blocks" in params
        assert client.get_metric_history(child.info.run_id, "val_accuracy"), "per-epoch metrics"
        if state == "COMPLETE":
            assert child.info.status == "FINISHED"
            assert 0 <= metrics["val_accuracy_final"] <= 1 and metrics["ms_per_image"] > 0
            assert metrics["parameters"] > 0 and metrics["flops"] > 0
            assert f"validation accuracy **{metrics['val_accuracy_final']:.4f}**" in child.data.tags["mlflow.note.content"]
        elif state == "PRUNED":
            assert "pruned after epoch" in child.data.tags["mlflow.note.content"]
    assert "Hyperparameter search" in tuned.parent.data.tags["mlflow.note.content"]  # what a reviewer reads first
    artifacts = {a.path for a in client.list_artifacts(tuned.parent.info.run_id)}
    artifacts |= {a.path for a in client.list_artifacts(tuned.parent.info.run_id, "plots")}
    assert {"trials.json", "pareto_front.json", "search_space", "plots/pareto_front.png"} <= artifacts
    assert "plots/optimization_history.png" in artifacts
    assert tuned.parent.data.metrics["trials_complete"] + tuned.parent.data.metrics["trials_pruned"] == 4


def test_the_pareto_front_is_the_non_dominated_trials_of_the_recorded_values(tuned):
    complete = {
        int(c.data.tags["tune.trial"]): (c.data.metrics["val_accuracy_final"], c.data.metrics["ms_per_image"])
        for c in tuned.children
        if c.data.tags["trial_state"] == "COMPLETE"
    }
    expected = {
        n for n, (acc, ms) in complete.items()
        if not any(a >= acc and m <= ms and (a, m) != (acc, ms) for a, m in complete.values())
    }  # fmt: skip
    front_file = Path(mlflow.artifacts.download_artifacts(run_id=tuned.parent.info.run_id, artifact_path="pareto_front.json"))
    front = json.loads(front_file.read_text())
    recorded = {row[front["columns"].index("trial")] for row in front["data"]}
    assert recorded == expected and expected
    assert {t.number for t in optuna_study(tuned.workdir).best_trials} == expected
    for number in expected:  # the printed summary table lists each
        assert any(line.split()[:1] == [str(number)] for line in tuned.stdout.splitlines() if line.startswith("  "))


def test_a_pruned_trial_shows_as_pruned_in_optuna_and_in_mlflow(tuned):
    pruned = [t.number for t in optuna_study(tuned.workdir).trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned, tuned.stdout[-2000:]
    for number in pruned:
        child = tuned.children[number]
        assert child.data.tags["trial_state"] == "PRUNED" and child.info.status == "KILLED"
        assert "pruned_at_epoch" in child.data.metrics
        assert f"trial {number}: pruned" in tuned.stdout


def test_promote_best_retrains_the_chosen_trial_through_the_job_and_the_gate(tuned):
    config = tuned.workdir / "chosen.yaml"
    proc = run_pipeline(tune_args("--promote-best", "--write-config", str(config)), store_env(tuned.workdir), tuned.workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already holds 4 finished trials" in proc.stdout  # no new trials: the study was complete
    best = sorted(optuna_study(tuned.workdir).best_trials, key=lambda t: -t.values[0])[0]
    cfg = load_config(str(config))
    assert (
        cfg.name == f"search-tiny-trial-{best.number}" and cfg.model.model_dump(mode="json") == best.user_attrs["config"]["model"]
    )
    client = MlflowClient()
    (version,) = client.search_model_versions("name='mnist-cnn'")
    run = client.get_run(version.run_id)
    assert run.data.tags["config"] == cfg.name and run.data.tags["gate_decision"] in ("promoted", "not promoted")
    assert "gate:" in proc.stdout


def test_set_fixes_a_searched_key_subset_trials_learn_and_the_top_two_retrain_on_all_the_data(tmp_path):
    """--set of a key the space varies holds for every trial; trials on 600 images with batch norm learn
    (they scored at chance before: BN statistics trailing the weights); --retrain-top 2 trains the two
    best through the job on the whole training split."""
    args = tune_args(
        "--set", "training.learning_rate=0.003", "--set", "data.train_limit=600", "--set", "model.batch_norm=true",
        "--set", "training.batch_size=32", "--set", "model.global_pooling=false", "--retrain-top", "2", "--retrain-set", "epochs=1", trials=3, epochs=4,
    )  # fmt: skip
    proc = run_pipeline(args, store_env(tmp_path), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (fixed,) = [line for line in proc.stdout.splitlines() if line.startswith("fixed for every trial (--set), not searched:")]
    assert "training.learning_rate=0.003" in fixed and "data.train_limit=600" in fixed
    mlflow.set_tracking_uri(store_env(tmp_path)["MLFLOW_TRACKING_URI"])
    runs = mlflow.search_runs(experiment_names=["mnist"], output_format="list")
    (parent,) = [run for run in runs if run.info.run_name == "tune search-tiny"]
    assert parent.data.params["fixed.training.learning_rate"] == "0.003" and "learning_rate" in parent.data.tags["tune.fixed"]
    trials = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trials) == 3
    for trial in trials:
        assert trial.data.params["training.learning_rate"] == "0.003" and "search.training.learning_rate" not in trial.data.params
        assert trial.data.params["data.train_limit"] == "600"
    study = optuna_study(tmp_path)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete and all(t.user_attrs["val_accuracy"] > 0.3 for t in complete), [t.user_attrs for t in study.trials]

    retrained = [run for run in runs if run.info.run_name.startswith("search-tiny-trial-") and "tune.trial" not in run.data.tags]
    assert len(retrained) == 2, [run.info.run_name for run in runs]
    for run in retrained:
        assert run.info.status == "FINISHED" and run.data.params["data.train_limit"] == "None"
        assert run.data.params["training.epochs"] == "1" and run.data.tags["gate_decision"] in ("promoted", "not promoted")
    assert len(MlflowClient().search_model_versions("name='mnist-cnn'")) == 2


def test_successive_halving_prunes_only_at_its_rungs(tmp_path):
    space = tmp_path / "halving.yaml"
    space.write_text(SPACE.read_text().replace(
        "pruning: {startup_trials: 1, warmup_epochs: 0, percentile: 50}", "pruning: {kind: successive_halving, min_epochs: 1, reduction_factor: 3}"
    ))  # fmt: skip
    proc = run_pipeline([*tune_args(trials=4, epochs=3), "--space", str(space)], store_env(tmp_path), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = optuna_study(tmp_path, "halving").trials
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned, proc.stdout[-2000:]
    assert all(len(t.user_attrs["val_accuracy_history"]) in (1, 3) for t in pruned)  # rungs at epochs 1 and 3


def test_a_bad_space_fails_before_any_trial_naming_the_key(tmp_path):
    space = tmp_path / "bad.yaml"
    space.write_text("params:\n  training.learnig_rate: {float: [0.001, 0.01]}\n")
    proc = run_pipeline(
        ["tune", "--space", str(space), "--trials", "2", "--data", str(SAMPLE_NPZ)], store_env(tmp_path), tmp_path
    )
    assert proc.returncode == 2 and "training.learnig_rate" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()


def test_ctrl_c_fails_the_running_trial_keeps_the_finished_and_the_same_command_resumes(tmp_path):
    space = tmp_path / "no-pruning.yaml"  # the tiny space, never pruning, so trial 1 is still training when stopped
    space.write_text(SPACE.read_text().replace("startup_trials: 1", "startup_trials: 100"))
    args = [*tune_args(trials=3, epochs=4), "--space", str(space), "--seed", "6"]  # seed 6: two trainable rates first
    process = start_pipeline(args, store_env(tmp_path), tmp_path)
    seen, deadline = [], time.monotonic() + 240
    for line in process.stdout:
        seen.append(line)
        if line.startswith("  trial 1 epoch 1/") or time.monotonic() > deadline:
            break
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, "".join(seen)[-2000:] + stderr[-2000:]
    assert "interrupted" in stderr and "1 finished trial(s) stay" in stderr and "Traceback" not in stderr
    states = [t.state for t in optuna_study(tmp_path, "no-pruning").trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]
    mlflow.set_tracking_uri(store_env(tmp_path)["MLFLOW_TRACKING_URI"])
    statuses = {r.info.run_name: r.info.status for r in mlflow.search_runs(experiment_names=["mnist"], output_format="list")}
    assert statuses["trial 1"] == "FAILED" and statuses["trial 0"] == "FINISHED" and statuses["tune no-pruning"] == "KILLED"

    resumed = run_pipeline(args, store_env(tmp_path), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "1 of 3 trials finished" in resumed.stdout
    trials = optuna_study(tmp_path, "no-pruning").trials
    assert trials[1].state == optuna.trial.TrialState.FAIL
    assert sum(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in trials) == 3


def test_two_processes_share_one_postgresql_study_without_running_a_trial_twice(postgres_database, tmp_path):
    storage = postgres_database
    processes = []
    for worker in ("a", "b"):
        workdir = tmp_path / worker
        workdir.mkdir()
        processes.append(
            start_pipeline(tune_args("--storage", storage, "--study", "shared", trials=6), store_env(workdir), workdir)
        )
    outputs = [process.communicate(timeout=400) for process in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr[-3000:]
    ran = [
        {int(line.split()[1].rstrip(":")) for line in stdout.splitlines() if line.startswith("trial ")} for stdout, _ in outputs
    ]
    assert ran[0] and ran[1], "both processes ran trials"
    assert not ran[0] & ran[1], f"a trial ran twice: {ran}"
    study = optuna_study(tmp_path, "shared", storage.replace("postgresql://", "postgresql+psycopg://"))
    assert {t.number for t in study.trials} == ran[0] | ran[1]
    assert len([t for t in study.trials if t.state.is_finished()]) >= 6
