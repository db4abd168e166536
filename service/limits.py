"""ASGI middleware: body size, content type and JSON syntax checked before BentoML parses anything.

Every rejection is JSON ``{"error": "..."}``. Validation errors that BentoML reports for ``/predict``
(pydantic's ``{"error": "1 validation error ...", "detail": [...]}``) get their first message lifted
into ``error`` so clients read what is wrong at the top level; the dispatcher's 503 says it is overload.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import orjson

JSON_PATHS = ("/predict", "/v1/")
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class RequestLimits:
    def __init__(self, app: Callable, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        path = scope["path"]
        is_json_api = path.startswith(JSON_PATHS) and not path.startswith("/predict_image")
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if is_json_api and content_type != b"application/json":
            shown = content_type.decode("latin-1") or "(none)"
            return await _reject(send, 415, f"unsupported content type {shown}; send application/json")

        length = headers.get(b"content-length")
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                return await _reject(send, 400, "invalid Content-Length header")
            if size > self.max_body_bytes:
                return await _reject(send, 413, f"request body of {size} bytes is over the limit of {self.max_body_bytes} bytes")

        chunks, total, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_body_bytes:
                return await _reject(send, 413, f"request body is over the limit of {self.max_body_bytes} bytes")
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if is_json_api:
            if not body:
                return await _reject(send, 400, "empty request body; send JSON")
            try:
                orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                return await _reject(send, 400, f"malformed JSON: {exc}")

        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        if path == "/predict":
            send = _lift_validation_errors(send)
        return await self.app(scope, replay, send)


def validation_message(errors: list[dict[str, Any]]) -> str:
    """The first pydantic error's message as a client should read it (our validators raise ValueError)."""
    return errors[0]["msg"].removeprefix("Value error, ")


def _lift_validation_errors(send: Send) -> Send:
    status = 200
    start: dict[str, Any] | None = None

    async def wrapped(message: dict[str, Any]) -> None:
        nonlocal status, start
        if message["type"] == "http.response.start":
            status = message["status"]
            if status not in (400, 503):
                return await send(message)
            start = message  # hold the headers until the body is rewritten
            return None
        if status not in (400, 503) or start is None or message.get("more_body"):
            return await send(message)
        body = message.get("body", b"")
        if status == 503:
            body = orjson.dumps({"error": "process is overloaded: the batching dispatcher could not serve this "
                                          "request within BATCH_MAX_LATENCY_MS; retry with backoff"})
        try:
            payload = orjson.loads(body)
            detail = payload.get("detail") or []
            first = validation_message(detail)
            body = orjson.dumps({"error": first, "detail": detail})
        except (orjson.JSONDecodeError, AttributeError, IndexError, KeyError, TypeError):
            pass
        headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return wrapped


async def _reject(send: Send, status: int, message: str) -> None:
    body = orjson.dumps({"error": message})
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
