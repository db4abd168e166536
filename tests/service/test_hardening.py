"""The service as an attacker and a cluster treat it: bombs, slow clients, random paths, admin guessing,
registry outages. Each runs against a real ``bentoml serve`` with short client timeouts."""

from __future__ import annotations

import io
import secrets
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
from PIL import Image

from harness.launcher import free_port, start_mlflow_server, start_service, stop_process, stop_service
from tests.service.helpers import ADMIN_TOKEN

pytestmark = pytest.mark.slow
TIMEOUT_S = 2
MAX_CONCURRENCY = 16


@pytest.fixture(scope="module")
def strict(trained_registry, tmp_path_factory):
    home = tmp_path_factory.mktemp("strict")
    env = {
        **trained_registry.env,
        "MODEL_POLL_SECONDS": "0",
        "ADMIN_TOKEN": ADMIN_TOKEN,
        "TMPDIR": str(home),
        "CLIENT_HEADER_TIMEOUT_S": str(TIMEOUT_S),
        "CLIENT_BODY_TIMEOUT_S": str(TIMEOUT_S),
        "SERVICE_MAX_CONCURRENCY": str(MAX_CONCURRENCY),
        "MAX_IMAGE_PIXELS": str(9_000_000),
    }
    running = start_service(env, home / "service.log")
    assert running.process.poll() is None, running.log()[-3000:]
    yield running
    stop_service(running)


def _worker(running) -> psutil.Process:
    """The worker process (the one that loaded TensorFlow: the largest)."""
    children = psutil.Process(running.process.pid).children(recursive=True)
    return max(children, key=lambda p: p.memory_info().rss)


def _peak_rss_mib(process: psutil.Process) -> float:
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _read_until_closed(connection: socket.socket) -> bytes:
    parts = []
    while chunk := connection.recv(4096):
        parts.append(chunk)
    return b"".join(parts)


def _host_port(running) -> tuple[str, int]:
    host, port = running.url.removeprefix("http://").split(":")
    return host, int(port)


def test_decompression_bomb_is_refused_from_its_header_with_memory_bounded(strict):
    bomb = _png(Image.new("L", (12000, 12000), 255))  # 144 M pixels in ~165 KiB
    worker = _worker(strict)
    before = _peak_rss_mib(worker)
    for _ in range(3):
        started = time.monotonic()
        answer = requests.post(f"{strict.url}/predict_image", data=bomb, headers={"Content-Type": "image/png"}, timeout=30)
        assert answer.status_code == 413, answer.text
        assert "12000x12000" in answer.json()["error"] and "MAX_IMAGE_PIXELS" in answer.json()["error"]
        assert time.monotonic() - started < 2
    assert _peak_rss_mib(worker) - before < 50, "the bomb was decoded"
    assert requests.post(f"{strict.url}/predict", json=np.zeros((28, 28), int).tolist(), timeout=10).status_code == 200


def test_livez_answers_while_large_legal_pictures_decode(strict):
    rng = np.random.default_rng(0)
    noisy = _png(Image.fromarray(rng.integers(0, 256, (2900, 2900), dtype=np.uint8)))  # 8.4 M pixels in ~8 MiB
    worker = _worker(strict)
    before = _peak_rss_mib(worker)
    latencies: list[float] = []
    with ThreadPoolExecutor(6) as pool:
        uploads = [
            pool.submit(
                requests.post, f"{strict.url}/predict_image", data=noisy, headers={"Content-Type": "image/png"}, timeout=60
            )
            for _ in range(6)
        ]
        while not all(u.done() for u in uploads):
            started = time.monotonic()
            assert requests.get(f"{strict.url}/livez", timeout=10).status_code == 200
            latencies.append(time.monotonic() - started)
            time.sleep(0.05)
        statuses = [u.result().status_code for u in uploads]
    assert set(statuses) <= {200, 400}, statuses  # noise may read as a digit or as no digit; never a 5xx
    assert len(latencies) >= 3 and max(latencies) < 1.0, latencies
    # at most IMAGE_DECODE_CONCURRENCY (2) pictures in memory at once
    assert _peak_rss_mib(worker) - before < 600


def test_random_paths_get_json_404s_and_do_not_grow_metrics(strict):
    def metrics_size() -> int:
        return len(requests.get(f"{strict.url}/metrics", timeout=30).content)

    def burst(count: int) -> None:
        with requests.Session() as session:
            for i in range(count):
                path = secrets.token_hex(8)
                answer = (
                    session.get(f"{strict.url}/{path}/{i}", timeout=10)
                    if i % 3
                    else session.post(f"{strict.url}/v1/models/{path}:predict", json={}, timeout=10)
                )
                assert answer.status_code == 404 and "error" in answer.json()

    burst(30)  # the first unknown path adds the one "unmatched" series
    before = metrics_size()
    burst(2970)
    after = metrics_size()
    assert after - before < 1000, (before, after)  # counts grow, series do not
    text = requests.get(f"{strict.url}/metrics", timeout=30).text
    unmatched = [
        line
        for line in text.splitlines()
        if line.startswith("bentoml_service_request_total{")
        and 'endpoint="unmatched"' in line
        and 'http_response_code="404"' in line
    ]
    assert len(unmatched) == 1 and float(unmatched[0].split()[-1]) >= 3000, unmatched
    assert requests.get(f"{strict.url}/model", timeout=10).status_code == 200
    # a thousand of them were 404 answers from the TF route, and two hundred more are not even HTTP:
    # the log holds a burst of lines per 10 s and a count of the rest, not a line each
    host, port = strict.url.removeprefix("http://").split(":")
    for _ in range(200):
        with socket.create_connection((host, int(port)), timeout=10) as connection:
            connection.sendall(b"GET /\x00\x01 not http\r\n\r\n")
            connection.recv(1024)
    log = strict.log()
    assert log.count("answered 404") < 200, log.count("answered 404")
    assert log.count("Invalid HTTP request received.") <= 60, log.count("Invalid HTTP request received.")


def test_every_answer_is_json_with_nosniff_and_the_draw_page_has_a_csp(strict):
    cases = [
        ("get", "/no-such-page", 404),
        ("get", "/predict", 405),
        ("post", "/model", 405),
        ("get", "/v1/models/other", 404),
        ("get", "/v1/models/mnist/versions/999", 404),
    ]
    for method, path, status in cases:
        answer = getattr(requests, method)(f"{strict.url}{path}", timeout=10)
        assert answer.status_code == status, (path, answer.text)
        assert set(answer.json()) == {"error"} and answer.headers["X-Content-Type-Options"] == "nosniff"
    for path in ("/model", "/livez", "/draw", "/draw.js", "/metrics"):
        assert requests.get(f"{strict.url}{path}", timeout=10).headers["X-Content-Type-Options"] == "nosniff", path
    csp = requests.get(f"{strict.url}/draw", timeout=10).headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert requests.get(f"{strict.url}/draw.js", timeout=10).headers["content-type"].startswith("text/javascript")


def test_a_slow_body_gets_408_and_idle_clients_do_not_take_the_slots(strict, sample):
    host, port = _host_port(strict)
    idle = []
    try:
        for _ in range(MAX_CONCURRENCY * 2):  # more unfinished bodies than there are request slots
            connection = socket.create_connection((host, port), timeout=10)
            connection.sendall(
                b"POST /predict HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n[["
            )
            idle.append(connection)
        time.sleep(0.3)
        answers = [requests.post(f"{strict.url}/predict", json=sample["x_test"][i].tolist(), timeout=10) for i in range(20)]
        assert [a.status_code for a in answers] == [200] * 20
        started = time.monotonic()
        reply = _read_until_closed(idle[0])
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert b'"error"' in reply and time.monotonic() - started < TIMEOUT_S + 2
    finally:
        for connection in idle:
            connection.close()


def test_slow_headers_get_408_and_the_connection_closed(strict):
    host, port = _host_port(strict)
    with socket.create_connection((host, port), timeout=TIMEOUT_S + 5) as connection:
        connection.sendall(b"POST /predict HTTP/1.1\r\nHost: t\r\n")
        started = time.monotonic()
        for _ in range(3):  # a byte now and then does not keep the connection
            time.sleep(TIMEOUT_S / 4)
            connection.sendall(b"X")
        reply = _read_until_closed(connection)  # returns only once the server closes the connection
        assert reply.startswith(b"HTTP/1.1 408") and b"headers" in reply, reply[:200]
        assert time.monotonic() - started < TIMEOUT_S + 2


def test_admin_needs_the_bearer_scheme_and_guessing_is_rate_limited(strict):
    url = f"{strict.url}/admin/reload"
    assert requests.post(url, headers={"Authorization": ADMIN_TOKEN}, timeout=30).status_code == 401  # bare token
    assert requests.post(url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60).status_code == 200
    statuses = [  # a guesser naming a new X-Forwarded-For each time is still one client (no proxy is trusted)
        requests.post(
            url, headers={"Authorization": f"Bearer guess{i}", "X-Forwarded-For": f"203.0.113.{i}"}, timeout=30
        ).status_code
        for i in range(7)
    ]
    assert statuses[:4] == [401] * 4 and statuses[-1] == 429, statuses
    locked = requests.post(url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)
    assert locked.status_code == 429 and int(locked.headers["Retry-After"]) > 0
    info = requests.get(f"{strict.url}/model", timeout=10).json()
    assert "path" not in info and "/tmp" not in str(info)


def test_reloads_leave_no_downloaded_copies_behind(strict, trained_registry):
    workdirs = list(Path(strict.log_path.parent).glob("digits-models-*"))
    assert len(workdirs) == 1, workdirs  # the worker downloaded from the registry here (TMPDIR) ...
    downloads = list(workdirs[0].iterdir())
    assert downloads == [], downloads  # the served version's copy went once TensorFlow had loaded it


def _start_up_log_of_a_service_that_cannot_start(env: dict[str, str], tmp_path: Path, within_s: float = 60) -> str:
    """Start a service that must exit 3 within ``within_s`` with one line and no traceback; its log."""
    started = time.monotonic()
    running = start_service(env, tmp_path / "service.log", timeout=120)
    try:
        assert running.process.wait(timeout=within_s) == 3
    finally:
        stop_service(running)
    assert time.monotonic() - started < within_s
    assert "Traceback" not in running.log(), running.log()[-2000:]
    return running.log()


def test_a_missing_sqlite_store_is_reported_not_created(tmp_path):
    store = tmp_path / "typo" / "mlfow.db"
    (tmp_path / "typo").mkdir()
    log = _start_up_log_of_a_service_that_cannot_start({"MLFLOW_TRACKING_URI": f"sqlite:///{store}"}, tmp_path)
    assert "does not exist" in log and not store.exists()


def test_registry_down_at_start_exits_quickly_with_one_line(tmp_path):
    env = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}", "REGISTRY_TIMEOUT_S": "4"}
    assert "cannot reach the MLflow tracking store" in _start_up_log_of_a_service_that_cannot_start(env, tmp_path)


def test_reload_during_a_registry_outage_fails_fast_with_503(trained_registry, tmp_path):
    store = tmp_path / "mlflow.db"
    shutil.copy(trained_registry.tracking_uri.removeprefix("sqlite:///"), store)
    server = start_mlflow_server(f"sqlite:///{store}", tmp_path / "mlflow.log")
    running = None
    try:
        assert server.process.poll() is None, server.log()[-3000:]
        running = start_service(
            {"MLFLOW_TRACKING_URI": server.url, "MODEL_POLL_SECONDS": "0", "ADMIN_TOKEN": ADMIN_TOKEN, "REGISTRY_TIMEOUT_S": "4"},
            tmp_path / "service.log",
        )
        assert running.process.poll() is None, running.log()[-3000:]
        stop_process(server)
        started = time.monotonic()
        answer = requests.post(f"{running.url}/admin/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60)
        assert answer.status_code == 503 and "cannot reach" in answer.json()["error"], answer.text
        assert time.monotonic() - started < 15
        assert requests.post(f"{running.url}/predict", json=np.zeros((28, 28), int).tolist(), timeout=10).status_code == 200
    finally:
        if running:
            stop_service(running)
        stop_process(server)
