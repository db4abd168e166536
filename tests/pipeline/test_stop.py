"""SIGINT and SIGTERM as the training job sees them, in-process."""

import os
import signal

import pytest

from pipeline.stop import Stopped, StopSignals, exit_status


@pytest.fixture
def stop():
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield StopSignals().install()
    for sig, handler in previous.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_outside_the_commit_interrupts(stop, sig):
    with pytest.raises(Stopped, match=f"stopped by {sig.name}") as stopped:
        os.kill(os.getpid(), sig)  # Python runs the handler right after this call returns
    assert stopped.value.signum == sig
    assert exit_status(stopped.value) == 128 + sig  # what a shell reports for a process killed by sig


def test_an_interrupt_without_a_signal_exits_as_ctrl_c():
    assert exit_status(KeyboardInterrupt()) == 130


def test_a_signal_inside_the_commit_is_recorded_and_the_commit_finishes(stop):
    finished = False
    with stop.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        finished = True
    assert finished and stop.received == "SIGTERM"  # the first one is the one reported
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)


def test_after_a_kept_commit_nothing_interrupts_any_more(stop):
    with stop.deferred(keep=True):
        pass
    os.kill(os.getpid(), signal.SIGINT)  # would raise KeyboardInterrupt without keep
    assert stop.received == "SIGINT"
