"""The edge, in-process: its route table, its request limits (body size and time, concurrency), and
the admin rate limit."""

import asyncio
import json
import logging
import time

import pytest

from service import http
from service.admin import FailedAttempts
from service.edge import Edge, EdgeLimits, RouteTable
from service.errors import ClientErrorLog, ThrottledMessage


@pytest.fixture(scope="module")
def table() -> RouteTable:
    return RouteTable(http.app.routes)


@pytest.mark.parametrize(
    ("path", "label", "method"),
    [
        ("/predict", "/predict", "POST"),
        ("/predict_image", "/predict_image", "POST"),
        ("/model", "/model", "GET"),
        ("/draw", "/draw", "GET"),
        ("/livez", "/livez", "GET"),
        ("/metrics", "/metrics", "GET"),
        ("/v1/models/mnist:predict", "/v1/models/{model}:predict", "POST"),
        ("/v1/models/mnist/versions/7:predict", "/v1/models/{model}:predict", "POST"),
        ("/v1/models/mnist/versions/123456", "/v1/models/{model}", "GET"),
        ("/v1/models/mnist/metadata", "/v1/models/{model}/metadata", "GET"),
    ],
)
def test_known_paths_get_their_route_template(table, path, label, method):
    matched = table.match(path)
    assert matched is not None and matched[0] == label and method in matched[1]


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/nope",
        "/predict/",
        "/v1/models/other:predict",
        "/v1/models/mnist:explain",
        "/static_content/../../etc/passwd",
        "/v1/models/mnist/versions/x",
    ],
)
def test_other_paths_are_unmatched(table, path):
    if path == "/":
        assert table.match(path)[0] == "/"  # BentoML's Swagger UI
    else:
        assert table.match(path) is None


def test_failed_admin_attempts_lock_out_one_address_for_the_window():
    attempts = FailedAttempts(limit=3, window_s=60)
    for _ in range(3):
        assert attempts.retry_after("10.0.0.1") == 0
        attempts.failed("10.0.0.1")
    assert 0 < attempts.retry_after("10.0.0.1") <= 61
    assert attempts.retry_after("10.0.0.2") == 0  # others are not affected
    expired = FailedAttempts(limit=1, window_s=0.0)
    expired.failed("10.0.0.3")
    assert expired.retry_after("10.0.0.3") == 0


# -- the request limits, in-process: the edge in front of a stand-in app ---------------------------


def run_edge(
    limits: EdgeLimits,
    messages: list[dict],
    path: str = "/predict",
    method: str = "POST",
    app_wait: asyncio.Event | None = None,
    concurrent: int = 1,
    held_path: str = "/predict",
) -> list[dict]:
    """Send one request (``concurrent`` at once, the others held inside the app) through an Edge; returns
    the first request's response messages, and whether the app ever saw a body."""

    async def app(scope: dict, receive, send) -> None:
        body = (await receive())["body"]
        if app_wait is not None and scope["method"] == "POST":  # predictions hold their slots; probes do not wait
            await app_wait.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"app saw " + body})

    edge = Edge(app, limits, lambda: RouteTable(http.app.routes))

    async def one(feed: list[dict], path: str = path, method: str = method) -> list[dict]:
        pending, sent = list(feed), []

        async def receive() -> dict:
            if pending:
                item = pending.pop(0)
                if item.get("delay"):
                    await asyncio.sleep(item["delay"])
                return {key: value for key, value in item.items() if key != "delay"}
            await asyncio.sleep(3600)

        async def send(message: dict) -> None:
            sent.append(message)

        await edge(scope={"type": "http", "path": path, "method": method, "headers": []}, receive=receive, send=send)
        return sent

    async def main() -> list[dict]:
        held = [
            asyncio.create_task(one([{"type": "http.request", "body": b"x"}], held_path, "POST")) for _ in range(concurrent - 1)
        ]
        await asyncio.sleep(0.05)
        answer = await one(messages)
        if app_wait is not None:
            app_wait.set()
        await asyncio.gather(*held)
        return answer

    return asyncio.run(main())


def status_and_json(sent: list[dict]) -> tuple[int, dict | bytes]:
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    start = sent[0]
    is_json = (b"content-type", b"application/json") in start["headers"]
    return start["status"], json.loads(body) if is_json else body


LIMITS = EdgeLimits(max_body_bytes=100, body_timeout_s=0.3, max_concurrency=2)


def test_a_body_in_pieces_reaches_the_app_whole():
    sent = run_edge(
        LIMITS,
        [{"type": "http.request", "body": b"ab", "more_body": True}, {"type": "http.request", "body": b"cd", "more_body": False}],
    )
    assert status_and_json(sent) == (200, b"app saw abcd")


def test_a_body_over_the_limit_gets_413_naming_the_limit():
    sent = run_edge(
        LIMITS,
        [
            {"type": "http.request", "body": b"x" * 60, "more_body": True},
            {"type": "http.request", "body": b"x" * 60, "more_body": False},
        ],
    )
    status, body = status_and_json(sent)
    assert status == 413 and "100 bytes" in body["error"]


def test_a_body_slower_than_the_timeout_gets_408():
    sent = run_edge(
        LIMITS,
        [
            {"type": "http.request", "body": b"ab", "more_body": True},
            {"type": "http.request", "body": b"cd", "more_body": False, "delay": 1.0},
        ],
    )
    status, body = status_and_json(sent)
    assert status == 408 and "0.3 s" in body["error"]


def test_requests_over_the_concurrency_limit_get_429_with_retry_after():
    sent = run_edge(LIMITS, [{"type": "http.request", "body": b"x"}], app_wait=asyncio.Event(), concurrent=3)
    status, body = status_and_json(sent)
    assert status == 429 and "at most 2" in body["error"] and (b"retry-after", b"1") in sent[0]["headers"]


@pytest.mark.parametrize("probe", ["/livez", "/readyz", "/v2/health/live", "/v2/health/ready"])
def test_health_probes_answer_while_every_slot_is_taken(probe):
    """Kubernetes' and KServe's probes must not fail because predictions fill the concurrency limit."""
    sent = run_edge(LIMITS, [{"type": "http.request", "body": b""}], probe, "GET", app_wait=asyncio.Event(), concurrent=3)
    assert sent[0]["status"] == 200


@pytest.mark.parametrize(("budget", "status"), [(150, 503), (200, 200)])
def test_bodies_held_at_once_stay_within_the_workers_budget(budget, status):
    """A first body of 90 bytes is still arriving; a second of 90 fits a budget of 200, not of 150."""
    limits = EdgeLimits(max_body_bytes=100, body_timeout_s=0.3, max_concurrency=4, max_body_bytes_in_flight=budget)

    async def app(scope: dict, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": (await receive())["body"]})

    edge = Edge(app, limits, lambda: RouteTable(http.app.routes))
    scope = {"type": "http", "path": "/predict", "method": "POST", "headers": []}

    async def main() -> list[dict]:
        first = [{"type": "http.request", "body": b"x" * 90, "more_body": True}]

        async def trickle() -> dict:
            return first.pop() if first else await asyncio.sleep(1.0)  # then silence: a 408 at 0.3 s

        async def ignore(message: dict) -> None:
            pass

        held = asyncio.create_task(edge(scope=dict(scope), receive=trickle, send=ignore))
        await asyncio.sleep(0.05)
        sent: list[dict] = []

        async def receive() -> dict:
            return {"type": "http.request", "body": b"y" * 90, "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        await edge(scope=dict(scope), receive=receive, send=send)
        await held
        return sent

    sent = asyncio.run(main())
    answer, body = status_and_json(sent)
    assert answer == status
    if status == 503:
        assert "too many request bodies" in body["error"] and (b"retry-after", b"1") in sent[0]["headers"]


@pytest.mark.parametrize(("path", "method", "status"), [("/nope", "GET", 404), ("/predict", "GET", 405)])
def test_unknown_paths_and_methods_get_json_errors(path, method, status):
    answer, body = status_and_json(run_edge(LIMITS, [], path=path, method=method))
    assert answer == status and path in body["error"]


def test_a_line_written_per_bad_request_is_throttled_to_a_burst_and_a_count(caplog):
    logger = logging.getLogger("test.throttled")
    logger.addFilter(ThrottledMessage("Invalid HTTP request received.", ClientErrorLog(logger, burst=3, window_s=0.2)))
    with caplog.at_level(logging.WARNING, logger="test.throttled"):
        for _ in range(50):
            logger.warning("Invalid HTTP request received.")
        logger.warning("something else")  # other lines pass untouched
        time.sleep(0.25)
        logger.warning("Invalid HTTP request received.")  # a new window: the count of the last comes first
    lines = [record.getMessage() for record in caplog.records]
    assert lines.count("Invalid HTTP request received.") == 4 and "something else" in lines
    assert "... and 47 more client errors in the last 0 s, not logged one by one" in lines
