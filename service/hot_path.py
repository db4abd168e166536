"""The prediction routes' hot path: ``POST /predict``, ``/v1/models/mnist:predict`` and
``/v2/models/mnist/infer`` from request bytes to answer bytes, and :class:`HotRoutes`, the raw-ASGI
front that answers them before any router.

These are the routes called thousands of times a second. Starlette's router, FastAPI's request handling
and their exception middlewares cost about a fifth of a worker's time per request (py-spy,
docs/performance.md), so :class:`HotRoutes` skips them. The FastAPI routes in :mod:`service.http` call
the same handlers, so both answer alike; they document these paths and serve them if the front is off.
Nothing here imports FastAPI.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import ClientDisconnect

from service import open_inference, tfserving
from service.core import ServingCore
from service.errors import ClientErrorLog, InputError, PayloadTooLarge, ServiceError, UnsupportedMediaType, error_body
from service.inputs import pixels_from_json_body
from service.rollout import CANARY_KEY
from service.runtime import Prediction

logger = logging.getLogger("digits.http")
client_errors = ClientErrorLog(logger)  # one throttle for every HTTP route (service.http uses it too)


def check_json_body(content_type: str | None, body: bytes | None) -> None:
    """``content_type`` None: any Content-Type is read as JSON (TensorFlow Serving's REST API ignores the
    header, and its own clients — ``requests.post(url, data=...)``, ``curl -d`` — send none or a form type)."""
    content_type = content_type.split(";")[0].strip().lower() if content_type is not None else "application/json"
    if content_type != "application/json":
        raise UnsupportedMediaType(f"unsupported content type {content_type or '(none)'}; send application/json")
    if body is not None and not body:
        raise InputError("empty request body; send JSON")


async def read_body(content_type: str | None, length: str | None, chunks: AsyncIterator[bytes], limit: int, json: bool) -> bytes:
    if json:
        check_json_body(content_type, None)
    if length is not None:
        if not length.isdigit():
            raise InputError("invalid Content-Length header")
        if int(length) > limit:
            raise PayloadTooLarge(f"request body of {length} bytes is over the limit of {limit} bytes")
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
        parts.append(chunk)
    body = b"".join(parts)
    if json and not body:
        raise InputError("empty request body; send JSON")
    return body


@dataclass(frozen=True)
class Encoded:
    """An answer already in bytes, with its own Content-Type and headers (V2's binary tensors)."""

    payload: bytes
    media_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


def answers(prediction: Prediction) -> list[dict[str, Any]]:
    version = prediction.model.version
    return [
        {"digit": digit, "probabilities": probabilities, "model_version": version}
        for digit, probabilities in zip(prediction.digits.tolist(), prediction.probabilities.tolist(), strict=True)
    ]


async def predict_json(body: bytes, core: ServingCore, max_images: int) -> tuple[Any, Prediction]:
    """``POST /predict``: a JSON body -> (the answer, the prediction it came from)."""
    prediction = await core.predict(pixels_from_json_body(body, max_images, "request body"), "http_json")
    return answers(prediction), prediction


async def predict_tf_rest(body: bytes, core: ServingCore, max_images: int, version: str | None = None) -> tuple[Any, Prediction]:
    """``POST /v1/models/mnist[/versions/N]:predict``: a TF Serving REST body -> (the answer, the prediction)."""
    core.model(version)
    pixels, columnar = tfserving.parse_rest_predict(body, max_images)
    prediction = await core.predict(pixels, "tf_rest", version)
    return tfserving.rest_predict_response(prediction, columnar), prediction


async def infer_v2(
    body: bytes, core: ServingCore, max_images: int, version: str | None = None, header_length: str | None = None
) -> tuple[Encoded, Prediction]:
    """``POST /v2/models/mnist[/versions/N]/infer``: an Open Inference Protocol body -> (the answer, the prediction)."""
    core.model(version)
    request = open_inference.parse_rest_infer(body, header_length, max_images)
    prediction = await core.predict(request.pixels, "v2_rest", version)
    payload, json_length = open_inference.rest_infer_response(prediction, request)
    if json_length is None:
        return Encoded(payload), prediction
    return Encoded(payload, "application/octet-stream", ((open_inference.HEADER_LENGTH, str(json_length)),)), prediction


HotHandler = Callable[[bytes, dict[bytes, bytes], ServingCore, int], Awaitable[tuple[Any, Prediction]]]
V2_INFER = f"/v2/models/{open_inference.MODEL_NAME}/infer"
HOT_ROUTES: dict[str, HotHandler] = {
    "/predict": lambda body, headers, core, max_images: predict_json(body, core, max_images),
    f"/v1/models/{tfserving.MODEL_NAME}:predict": lambda body, headers, core, max_images: predict_tf_rest(body, core, max_images),
    V2_INFER: lambda body, headers, core, max_images: infer_v2(
        body, core, max_images, header_length=_latin1(headers.get(open_inference.HEADER_LENGTH.encode()))
    ),
}
# TF Serving ignores the header; V2's binary extension sends application/octet-stream
ANY_CONTENT_TYPE = frozenset({f"/v1/models/{tfserving.MODEL_NAME}:predict", V2_INFER})
JSON_HEADER = (b"content-type", b"application/json")


Response = tuple[int, list[tuple[bytes, bytes]], bytes]  # status, headers, payload


class HotRoutes:
    """Raw ASGI for ``POST /predict``, ``/v1/models/mnist:predict`` and ``/v2/models/mnist/infer``, in
    front of the routers; every other request goes on to ``app``. ``state`` holds what a worker set
    when it started (``core``, ``settings``: the FastAPI app's state). When :class:`service.edge.FastLane` is in
    front of the worker (the default), these routes are answered there and never reach this layer;
    here they meet the edge and BentoML's own middlewares (metrics, tracing, access log) first.
    """

    def __init__(self, app: Callable | None, state: Any) -> None:
        self.app, self.state = app, state
        self.routes = HOT_ROUTES

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        handler = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if handler is None:
            return await self.app(scope, receive, send)
        response = await self.answer(scope, handler, scope.get("digits.body"), receive)
        if response is not None:
            await send_response(send, *response)

    async def answer(
        self, scope: dict, handler: HotHandler, body: bytes | None, receive: Callable | None = None
    ) -> Response | None:
        """The answer to a hot route's request; ``body`` None: read it from ``receive`` first (None back
        when the client went away meanwhile)."""
        settings, core = self.state.settings, self.state.core
        headers = dict(scope["headers"])
        try:
            content_type = None if scope["path"] in ANY_CONTENT_TYPE else headers.get(b"content-type", b"").decode("latin-1")
            if body is None:
                body = await read_body(
                    content_type, _latin1(headers.get(b"content-length")), _chunks(receive), settings.max_body_bytes, json=True
                )
            else:
                check_json_body(content_type, body)
            canary_key = headers.get(b"x-canary-key")
            token = CANARY_KEY.set(canary_key.decode("latin-1")) if canary_key else None
            try:
                content, prediction = await handler(body, headers, core, settings.max_images_per_request)
            finally:
                if token is not None:
                    CANARY_KEY.reset(token)
            response_headers = [JSON_HEADER, (b"x-model-version", prediction.model.version.encode())]
            if isinstance(content, Encoded):
                response_headers[0] = (b"content-type", content.media_type.encode())
                response_headers += [(name.encode(), value.encode()) for name, value in content.headers]
                return 200, response_headers, content.payload
            return 200, response_headers, orjson.dumps(content)
        except ClientDisconnect:
            return None
        except ServiceError as error:
            client_errors.warning("%s [POST] answered %d: %s", scope["path"], error.http_status, error)
            return error.http_status, [JSON_HEADER], error_body(str(error))
        except Exception:
            logger.exception("%s [POST] failed", scope["path"])
            return 500, [JSON_HEADER], error_body("internal error; see the service log")


async def send_response(send: Callable, status: int, headers: list[tuple[bytes, bytes]], payload: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(payload)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def _latin1(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None


async def _chunks(receive: Callable) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return
