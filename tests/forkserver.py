"""``python -m pipeline`` in real processes that skip the interpreter's 13 s of imports.

Every training the slow tests start used to import TensorFlow, Keras and MLflow afresh: a seed training
on the sample cost 33-35 s of CPU that way and 19-21 s from this server (docs/testing.md), on a suite
that is CPU-bound on two cores. A fork
server (the idea of ``multiprocessing``'s ``forkserver``, for a command line) imports them once per
pytest worker and forks a child per command. The child is a real process of its own: its own pid,
stdin/stdout/stderr pipes, environment and working directory; it runs ``pipeline/__main__.py`` as
``python -m pipeline`` would, takes SIGTERM, SIGINT and SIGKILL itself, and leaves the interpreter the
normal way (exit handlers, thread joins), so its exit status is the one a user sees.

What it cannot show is the interpreter's start: ``tests/harness/test_forkserver.py`` compares forked
commands with fresh ones, ``test_ctrl_c_marks_the_run_failed`` runs a fresh ``python -m pipeline``, and
``TEST_FORKSERVER=0`` runs every pipeline command in a fresh interpreter. The server is single-threaded when it forks (a child of a multi-threaded parent can
inherit a held lock); TensorFlow's context is not yet initialised there, so each child sets its own
threads and devices as a fresh process does.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
ENABLED = os.environ.get("TEST_FORKSERVER", "1") != "0"
# what the pipeline's commands import lazily, so that a child finds them imported
PRELOAD = (
    "pipeline", "tensorflow", "keras", "mlflow", "mlflow.tensorflow", "optuna", "matplotlib.pyplot",
    "pipeline.cli", "pipeline.job", "pipeline.tune", "pipeline.recover", "pipeline.feedback",
)  # fmt: skip


class ForkedProcess:
    """The part of ``subprocess.Popen`` the tests use, for a child of the fork server (not of this
    process, so its status arrives over the server's socket instead of from ``waitpid``)."""

    def __init__(self, connection: socket.socket, pid: int, stdout, stderr) -> None:
        self._connection = connection
        self.pid, self.stdout, self.stderr = pid, stdout, stderr
        self.returncode: int | None = None
        self.args = ["python", "-m", "pipeline"]

    def poll(self) -> int | None:
        if self.returncode is None and select.select([self._connection], [], [], 0)[0]:
            self._read_status()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            if not select.select([self._connection], [], [], timeout)[0]:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self._read_status()
        return self.returncode

    def _read_status(self) -> None:
        self.returncode = os.waitstatus_to_exitcode(int(_read_line(self._connection)))
        self._connection.close()

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Read both pipes to their end and wait, as ``Popen.communicate`` does."""
        outputs: dict[str, str] = {}
        readers = [
            threading.Thread(target=lambda name=name, pipe=pipe: outputs.__setitem__(name, pipe.read()), daemon=True)
            for name, pipe in (("stdout", self.stdout), ("stderr", self.stderr))
            if pipe is not None
        ]
        for reader in readers:
            reader.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        for reader in readers:
            reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return outputs.get("stdout", ""), outputs.get("stderr", "")


def _read_line(connection: socket.socket) -> str:
    """One short line, byte by byte, so nothing after it is buffered away."""
    line = b""
    while not line.endswith(b"\n"):
        if not (byte := connection.recv(1)):
            raise ConnectionError("the fork server closed the connection before the child's status")
        line += byte
    return line.decode()


_shared: ForkServer | None = None


def shared() -> ForkServer:
    """This pytest worker's fork server, started on first use (about 13 s of imports, once) and again if
    it has died, stopped at exit."""
    global _shared
    if _shared is not None and _shared.process.poll() is not None:  # gone (killed, out of memory): start anew
        _shared = None
    if _shared is None:
        _shared = ForkServer(Path(tempfile.mkdtemp(prefix="forkserver-")))  # short: a socket path has a limit
        atexit.register(_shared.stop)
    return _shared


class ForkServer:
    """The client side of one server process (:func:`shared` keeps one per pytest worker)."""

    def __init__(self, directory: Path) -> None:
        self.socket_path = directory / "forkserver.sock"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.forkserver", str(self.socket_path)],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.process.stdout.readline()
        if line.strip() != "ready":
            self.process.kill()
            raise RuntimeError(f"the fork server did not start (exit {self.process.wait()}): {line!r}")

    def start(
        self, args: list[str], env: dict[str, str], cwd: Path, log: Path | None = None, new_session: bool = False
    ) -> ForkedProcess:
        """Start ``python -m pipeline *args`` in ``cwd`` with exactly ``env`` and /dev/null as stdin:
        stdout and stderr as text pipes, or both into ``log``; in a session of its own if asked."""
        opened = [os.open(os.devnull, os.O_RDONLY)]
        if log is None:
            out_read, out_write = os.pipe()
            err_read, err_write = os.pipe()
            opened += [out_write, err_write]
            fds = opened
        else:
            opened.append(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
            fds = [opened[0], opened[1], opened[1]]
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            connection.connect(str(self.socket_path))
            request = json.dumps({"args": args, "env": env, "cwd": str(cwd), "new_session": new_session}).encode()
            socket.send_fds(connection, [len(request).to_bytes(8, "big") + request], fds)
        finally:
            for fd in opened:
                os.close(fd)
        pid = int(_read_line(connection))
        if log is not None:
            return ForkedProcess(connection, pid, None, None)
        return ForkedProcess(connection, pid, open(out_read, errors="replace"), open(err_read, errors="replace"))

    def stop(self) -> None:
        self.process.terminate()
        shutil.rmtree(self.socket_path.parent, ignore_errors=True)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _serve(socket_path: str) -> tuple[socket.socket, dict, list[int]] | None:
    """Accept requests and fork a child for each; return, in the child only, what it is to run."""
    import quiet

    quiet.import_tensorflow()  # as the pipeline does: quietly, and the device probe done once
    for module in PRELOAD:
        __import__(module)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(socket_path):
        os.unlink(socket_path)
    listener.bind(socket_path)
    listener.listen(16)
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    parent = os.getppid()
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wake_read, selectors.EVENT_READ)
    waiting: dict[int, socket.socket] = {}
    print("ready", flush=True)
    while os.getppid() == parent:  # the pytest worker is gone: so are we
        for key, _ in selector.select(timeout=1.0):
            if key.fileobj is wake_read:
                os.read(wake_read, 4096)
                continue
            connection, _ = listener.accept()
            connection.setblocking(True)
            message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
            while len(message) < 8 + int.from_bytes(message[:8], "big"):
                message += connection.recv(1 << 20)
            request = json.loads(message[8:])
            assert threading.active_count() == 1, "fork only from a single-threaded server"
            pid = os.fork()
            if pid == 0:
                signal.set_wakeup_fd(-1)
                for sig in (signal.SIGCHLD, signal.SIGTERM):
                    signal.signal(sig, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                selector.close()
                for fd in (wake_read, wake_write):
                    os.close(fd)
                listener.close()
                for other in waiting.values():
                    other.close()
                return connection, request, fds
            for fd in fds:
                os.close(fd)
            connection.sendall(f"{pid}\n".encode())
            waiting[pid] = connection
        while waiting:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            if (connection := waiting.pop(pid, None)) is not None:
                with connection, contextlib.suppress(OSError):  # a client that is gone needs no status
                    connection.sendall(f"{status}\n".encode())
    return None


def _become_the_command(connection: socket.socket, request: dict, fds: list[int]) -> None:
    """In the child: take the request's stdio, environment and directory, then run ``python -m pipeline``."""
    import runpy

    connection.close()
    if request["new_session"]:
        os.setsid()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in set(fds):
        os.close(fd)
    sys.stdout.reconfigure(write_through=True)  # like ``python -u``: a reader sees each line at once
    sys.stderr.reconfigure(write_through=True)
    os.environ.clear()
    os.environ.update(request["env"])
    os.chdir(request["cwd"])
    sys.argv = ["python -m pipeline", *request["args"]]
    runpy.run_module("pipeline", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    child = _serve(sys.argv[1])
    if child is not None:
        _become_the_command(*child)
