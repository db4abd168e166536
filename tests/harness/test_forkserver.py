"""The fork server the slow tests start the pipeline from behaves, to a caller, as ``python -m pipeline``
in a fresh interpreter does: same output, files and exit status, its own environment and directory.
Signals and their exit statuses (130, 143, SIGKILL) are checked through it by tests/pipeline/test_recovery.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from harness.launcher import child_env
from tests import forkserver
from tests.helpers import store_env

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not forkserver.ENABLED, reason="TEST_FORKSERVER=0: every command runs in a fresh interpreter"),
]


def fresh(args: list[str], env: dict[str, str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=cwd, env=child_env(env), capture_output=True, text=True, timeout=300
    )


def forked(args: list[str], env: dict[str, str], cwd) -> tuple[int, str, str]:
    process = forkserver.shared().start(args, child_env(env), cwd)
    stdout, stderr = process.communicate(timeout=300)
    return process.returncode, stdout, stderr


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--config", "no-such-config"],  # a CLI error naming the problem, exit 2
        ["recover", "--config", "seed"],  # MLflow, the store named by the environment, the working directory
        ["tune", "--help"],
    ],
)
def test_a_forked_command_answers_as_a_fresh_interpreter_does(args, tmp_path):
    here, there = tmp_path / "fresh", tmp_path / "child"
    here.mkdir()
    there.mkdir()
    expected = fresh(args, store_env(here), here)
    code, stdout, stderr = forked(args, store_env(there), there)
    assert (code, stdout.replace(str(there), str(here)), stderr.replace(str(there), str(here))) == (
        expected.returncode,
        expected.stdout,
        expected.stderr,
    )
    assert sorted(p.name for p in there.iterdir()) == sorted(p.name for p in here.iterdir())


def test_each_child_reads_the_environment_it_was_given_not_an_earlier_childs(tmp_path):
    for name in ("first.npz", "second.npz"):
        env = {**store_env(tmp_path), "PIPELINE_DATA": str(tmp_path / name)}
        code, _, stderr = forked(["train", "--config", "seed"], env, tmp_path)
        assert code == 2 and name in stderr and "Traceback" not in stderr, stderr
    assert "first.npz" not in stderr
