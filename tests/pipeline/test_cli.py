"""``python -m pipeline`` as a process: what it leaves to the interpreter when it exits."""

from __future__ import annotations

import subprocess
import sys

from harness.launcher import child_env
from tests.helpers import REPO_ROOT

# Registered before the command runs, so it runs after every exit handler the command registers.
AFTER_THE_COMMAND = """
import atexit, gc, runpy, sys
atexit.register(lambda: print(f"exit handlers ran; objects frozen: {gc.get_freeze_count()}", flush=True))
sys.argv = ["pipeline", *sys.argv[1:]]
runpy.run_module("pipeline", run_name="__main__", alter_sys=True)
"""


def test_a_finished_command_keeps_its_exit_status_and_handlers_and_skips_the_last_garbage_collection():
    """The interpreter's final collections over what TensorFlow, Keras and MLflow built cost 1.7-1.9 s
    per command (docs/testing.md): the command freezes its objects once its status is decided."""
    done = subprocess.run(
        [sys.executable, "-c", AFTER_THE_COMMAND, "recover", "--help"],
        capture_output=True, text=True, cwd=REPO_ROOT, env=child_env(), timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage: python -m pipeline recover" in done.stdout
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("exit handlers ran; objects frozen: ") and int(last.rsplit(" ", 1)[1]) > 0, last

    failed = subprocess.run(
        [sys.executable, "-c", AFTER_THE_COMMAND, "train", "--config", "no-such-config"],
        capture_output=True, text=True, cwd=REPO_ROOT, env=child_env(), timeout=120,
    )  # fmt: skip
    assert failed.returncode == 2 and "no-such-config" in failed.stderr, failed.stderr[-2000:]
    assert "objects frozen: " in failed.stdout and "Traceback" not in failed.stderr
