"""The framework patches (``service/framework_patches.py``), in-process: each still has its target, and
each does what it is there for."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import uvicorn

from service import framework_patches
from service.framework_patches import PATCHED, ResponseDeadline, own_listener, resolve


@pytest.mark.parametrize("patch", PATCHED, ids=[patch.name for patch in PATCHED])
def test_every_patched_framework_attribute_still_exists(patch):
    try:
        resolve(patch)
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"patch {patch.name!r} ({patch.written_for}): {patch.module}.{patch.attribute} is gone: {exc}")


def test_a_worker_imports_tensorflow_without_keras_and_still_runs_a_savedmodel(tmp_path):
    """In a fresh interpreter, as a worker starts: TensorFlow works (a SavedModel saves, loads and
    answers), neither Keras nor scikit-learn is imported, and Keras can still be imported after."""
    script = f"""
import sys
from service.framework_patches import import_tensorflow_without_keras
import_tensorflow_without_keras()
import tensorflow as tf
skipped = [name for name in ("keras", "sklearn") if name not in sys.modules]

class Double(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
    def __call__(self, x):
        return 2 * x

tf.saved_model.save(Double(), {str(tmp_path / "double")!r})
answer = tf.saved_model.load({str(tmp_path / "double")!r})(tf.constant([1.5])).numpy().tolist()
import keras
print(skipped, answer, keras.__name__)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    patch = "TensorFlow imported without Keras (framework_patches.import_tensorflow_without_keras)"
    assert done.returncode == 0, f"{patch} broke the import: {done.stderr[-2000:]}"
    assert done.stdout.split("\n")[-2] == "['keras', 'sklearn'] [3.0] keras", f"{patch} no longer works: {done.stdout}"


def test_bentoml_static_content_is_where_the_edge_looks():
    assert any(framework_patches.BENTOML_STATIC.rglob("*.js")), framework_patches.BENTOML_STATIC


def test_the_request_timeout_bentoml_builds_is_the_replacement():
    framework_patches.replace_request_timeout()
    from bentoml._internal.server.base_app import BaseAppFactory

    factory = SimpleNamespace(timeout=5, max_concurrency=None)
    assert [m.cls for m in BaseAppFactory.middlewares.fget(factory)] == [ResponseDeadline]


async def _call(app, timeout: float, middleware: ResponseDeadline | None = None) -> list[dict]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    await (middleware or ResponseDeadline(app, timeout))({"type": "http", "path": "/"}, receive, send)
    return sent


def _answer(status: int, body: bytes, delay_before: float = 0.0, delay_between: float = 0.0):
    async def app(scope, receive, send):
        await asyncio.sleep(delay_before)
        await send({"type": "http.response.start", "status": status, "headers": []})
        await asyncio.sleep(delay_between)
        await send({"type": "http.response.body", "body": body})

    return app


def test_an_answer_that_does_not_start_in_time_is_a_504_with_a_json_message():
    sent = asyncio.run(_call(_answer(200, b"late", delay_before=1.0), timeout=0.05))
    assert sent[0]["status"] == 504
    assert "0.05 seconds" in json.loads(sent[1]["body"])["error"]


def test_an_answer_that_started_in_time_is_not_cut_off():
    sent = asyncio.run(_call(_answer(200, b"slow body", delay_between=0.2), timeout=0.05))
    assert [m.get("status") for m in sent] == [200, None] and sent[1]["body"] == b"slow body"


def test_the_apps_own_timeout_error_is_not_taken_for_the_deadline():
    async def app(scope, receive, send):
        raise TimeoutError("the app's own")

    with pytest.raises(TimeoutError, match="the app's own"):
        asyncio.run(_call(app, timeout=5))


def test_answered_requests_leave_no_timer_behind():
    """BentoML's TimeoutMiddleware left one 30 s timer (SERVICE_TIMEOUT_S) (and its future) per request: 98,000 in a worker
    under load, and the garbage collector's long pauses with them. Here one sweep timer per worker."""
    middleware = ResponseDeadline(_answer(200, b"ok"), 60)

    async def many() -> int:
        loop = asyncio.get_running_loop()
        answers = await asyncio.gather(*(_call(None, 60, middleware) for _ in range(200)))
        assert all(sent[0]["status"] == 200 for sent in answers)
        return sum(1 for handle in loop._scheduled if not handle.cancelled())

    assert asyncio.run(many()) <= 1
    assert not len(middleware.deadlines)


def test_late_requests_among_many_get_504_and_the_rest_their_answer():
    async def app(scope, receive, send):
        await asyncio.sleep(1.0 if scope["path"] == "/slow" else 0.0)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = ResponseDeadline(app, 0.1)

    async def one(path: str) -> int:
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        await middleware({"type": "http", "path": path}, None, send)
        return sent[0]["status"]

    async def mixed() -> list[int]:
        return await asyncio.gather(*(one("/slow" if i % 2 else "/fast") for i in range(20)))

    assert asyncio.run(mixed()) == [504 if i % 2 else 200 for i in range(20)]


def _accept_all(listener: socket.socket) -> int:
    """How many connections wait on ``listener`` (accepted and closed here)."""
    listener.setblocking(False)
    accepted = 0
    while True:
        try:
            listener.accept()[0].close()
            accepted += 1
        except OSError:  # BlockingIOError when none is left; EINVAL on a socket not listening
            return accepted


def test_workers_own_listeners_share_the_connections_and_the_shared_socket_takes_none():
    shared = socket.socket()
    shared.bind(("127.0.0.1", 0))
    shared.listen(128)
    port = shared.getsockname()[1]
    workers = [own_listener(shared) for _ in range(2)]
    for listener in workers:
        listener.listen(128)  # as uvicorn does once the worker has started
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(64)]
    try:
        counts = [_accept_all(listener) for listener in [*workers, shared]]
        assert counts[2] == 0 and sum(counts[:2]) == 64
        assert min(counts[:2]) >= 16, counts  # kernel hashing: below 16 of 64 has probability ~5e-5
    finally:
        for sock in [*clients, *workers, shared]:
            sock.close()


def test_the_front_answers_before_the_app_a_real_uvicorn_server_was_given(monkeypatch):
    """``put_in_front`` makes its wrapper the outermost app of a uvicorn server (as each BentoML worker
    starts one): it answers what it chooses and hands the rest to the app uvicorn loaded."""
    monkeypatch.setattr(framework_patches, "_SERVE_WITH", {})

    async def app(scope, receive, send):
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"3")]})
            await send({"type": "http.response.body", "body": b"app"})

    def front(inner):
        async def wrapped(scope, receive, send):
            if scope["type"] == "http" and scope["path"] == "/front":
                await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]})
                return await send({"type": "http.response.body", "body": b"front"})
            await inner(scope, receive, send)

        return wrapped

    framework_patches.put_in_front(front)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))

    async def serve_and_ask() -> list[bytes]:
        serving = asyncio.create_task(server.serve(sockets=[listener]))
        while not server.started:
            await asyncio.sleep(0.01)
        answers = []
        for path in ("/front", "/other"):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
            answers.append((await reader.read()).rsplit(b"\r\n\r\n", 1)[1])
            writer.close()
        server.should_exit = True
        await serving
        return answers

    try:
        assert asyncio.run(asyncio.wait_for(serve_and_ask(), 30)) == [b"front", b"app"]
    finally:
        listener.close()


def test_a_worker_still_starting_takes_no_connections():
    """A worker's own socket listens only when uvicorn starts serving on it: until then every new
    connection goes to the workers already serving, none waits in a backlog nobody reads."""
    shared = socket.socket()
    shared.bind(("127.0.0.1", 0))
    shared.listen(128)
    port = shared.getsockname()[1]
    serving, starting = own_listener(shared), own_listener(shared)
    serving.listen(128)
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(32)]
    try:
        assert [_accept_all(serving), _accept_all(starting)] == [32, 0]
    finally:
        for sock in [*clients, serving, starting, shared]:
            sock.close()
