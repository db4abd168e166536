"""``predict`` as a typed BentoML API: what ``/schema.json``, the OpenAPI page and BentoML's own clients
(``bentoml.SyncHTTPClient``/``AsyncHTTPClient``) see, and, with ``BATCHER=bentoml``, ``/predict`` through
BentoML's adaptive batcher, kept to compare with the runtime batcher (see docs/service.md, `BATCHER`).

By default the declaration only describes ``POST /predict``: :class:`service.hot_path.HotRoutes` answers the
route before BentoML's router (the body is the API's root input, so a BentoML client's request is the
same JSON), and the method itself, if ever reached, goes through the serving core like every route.

With ``BATCHER=bentoml``, everything below works around BentoML 1.4 for that one route:
- its root-input models rebuild a pydantic TypeAdapter and JSON schema on every request (py-spy: over
  half the worker's CPU), so the input and output models below declare JSON and use orjson;
- it parses the body itself, so :class:`RequestLimits` checks size, content type and JSON syntax first
  and lifts pydantic's validation message into the ``{"error": ...}`` envelope;
- it logs a 400 for invalid input as an ERROR with a traceback, so a filter makes that one WARNING line.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import bentoml
import orjson
from pydantic import PlainValidator, ValidationError, WithJsonSchema

from service.errors import error_body
from service.hot_path import answers
from service.inputs import pixels_from_json
from service.metrics import batch_images

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def predict_api(max_images: int, max_batch_size: int | None = None, max_latency_ms: int | None = None) -> Any:
    """The ``predict`` method of the service class, as a BentoML API on ``/predict``: through BentoML's
    adaptive batcher when ``max_batch_size`` is given, else through the serving core."""
    pixel_batch = Annotated[
        Any,
        PlainValidator(lambda value: pixels_from_json(value, max_images, "request body")),
        WithJsonSchema(
            {
                "description": "One image (28 rows of 28 integers 0-255), a list of such images, "
                'or {"b64": base64 of N*784 raw uint8 pixels}',
                "example": [[0] * 28] * 28,
            }
        ),
    ]

    def signature(images: pixel_batch, /) -> list[dict[str, Any]]:  # type: ignore[valid-type]
        """The shape of ``predict`` without ``self``, for BentoML to build its input and output models from."""
        raise NotImplementedError

    def batched_predict(self: Any, images: pixel_batch, /) -> list[dict[str, Any]]:  # type: ignore[valid-type]
        """Digits for one image or a list of images (BentoML's adaptive batching)."""
        batch_images.observe(len(images))
        return answers(self.core.runtime.predict(images))

    async def predict(self: Any, images: pixel_batch, /) -> list[dict[str, Any]]:  # type: ignore[valid-type]
        """Digits for one image (28 rows of 28 integers 0-255) or a list of images: per image the digit,
        its 10 probabilities and the model version."""
        return answers(await self.core.predict(images, "http_json"))

    class PredictInput(bentoml.IODescriptor.from_input(signature)):  # type: ignore[misc]
        media_type = "application/json"

        @classmethod
        def model_validate_json(cls, json_data: str | bytes | bytearray, **kwargs: Any) -> PredictInput:
            return cls.model_validate(orjson.loads(json_data), **kwargs)

    class PredictOutput(bentoml.IODescriptor.from_output(signature)):  # type: ignore[misc]
        media_type = "application/json"

        def model_dump_json(self, **kwargs: Any) -> str:
            return orjson.dumps(self.root).decode()

    logging.getLogger("bentoml._internal.server.http_app").addFilter(ClientErrorsWithoutTracebacks())
    if max_batch_size is None:
        return bentoml.api(input_spec=PredictInput, output_spec=PredictOutput, name="predict")(predict)
    batched_predict.__name__ = "predict"
    return bentoml.api(
        input_spec=PredictInput,
        output_spec=PredictOutput,
        batchable=True,
        max_batch_size=max_batch_size,
        max_latency_ms=max_latency_ms,
    )(batched_predict)


class ClientErrorsWithoutTracebacks(logging.Filter):
    """BentoML logs a 400 for invalid input as an ERROR with a full traceback; the client already got
    a JSON message naming the problem, so the log gets one WARNING line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, ValidationError):
            record.msg = "%s [%s] answered 400: %s"
            record.args = (*record.args, validation_message(error.errors()))
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class RequestLimits:
    """ASGI middleware for BentoML's ``/predict``: body size, content type and JSON syntax checked
    before BentoML parses anything; its validation errors and 503 rewritten into the envelope."""

    def __init__(self, app: Callable, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/predict":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if content_type != b"application/json":
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

        return await self.app(scope, replay, _lift_validation_errors(send))


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
            body = orjson.dumps(
                {
                    "error": "process is overloaded: the batching dispatcher could not serve this "
                    "request within BATCH_MAX_LATENCY_MS; retry with backoff"
                }
            )
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
    body = error_body(message)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
