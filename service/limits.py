"""ASGI middleware: body size limit and content-type checks, answered as JSON before any parsing."""

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
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if path.startswith(JSON_PATHS) and not path.startswith("/predict_image") and content_type != b"application/json":
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
            return await self.app(scope, receive, send)

        # No Content-Length (chunked): read up to the limit, then replay the body to the app.
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
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


async def _reject(send: Send, status: int, message: str) -> None:
    body = orjson.dumps({"error": message})
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
