"""The HTTP routes: thin handlers that read a body once, call a protocol module and the serving core.

Mounted into the BentoML service at ``/`` (see :mod:`service.service`), which sets ``app.state.core``
and ``app.state.settings`` when a worker starts. Every error answers ``{"error": message}``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import HTMLResponse, Response

from service import open_inference, tfserving
from service.core import ServingCore
from service.errors import (
    ClientErrorLog,
    InputError,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    UnsupportedMediaType,
    error_body,
    error_response,
    response_for,
)
from service.feedback import parse_feedback
from service.inputs import parsed_json, pixels_from_image_bytes, pixels_from_json_body
from service.metrics import feedback_received
from service.rollout import CANARY_KEY, Rollout
from service.runtime import ModelLoadError, Prediction, RegistryUnavailable, parse_registry_uri
from service.webhooks import RegistryEvent

logger = logging.getLogger("digits.http")
client_errors = ClientErrorLog(logger)
STATIC = Path(__file__).parent / "static"
DRAW_PAGE = (STATIC / "draw.html").read_text()
DRAW_ASSETS = {
    "draw.css": ((STATIC / "draw.css").read_bytes(), "text/css; charset=utf-8"),
    "draw.js": ((STATIC / "draw.js").read_bytes(), "text/javascript; charset=utf-8"),
}

app = FastAPI(
    title="Digits: handwritten digit predictions",
    description="HTTP JSON, image upload, TensorFlow Serving REST, Open Inference Protocol (V2) REST; gRPC on GRPC_PORT",
)


def _core(request: Request) -> ServingCore:
    return request.app.state.core


def _settings(request: Request) -> Any:
    return request.app.state.settings


@app.exception_handler(ServiceError)
async def _client_error(request: Request, error: ServiceError) -> Response:
    client_errors.warning("%s [%s] answered %d: %s", request.url.path, request.method, error.http_status, error)
    return response_for(error)


@app.exception_handler(HTTPException)
async def _http_error(request: Request, error: HTTPException) -> Response:
    return error_response(error.status_code, str(error.detail))


@app.exception_handler(Exception)
async def _unexpected(request: Request, error: Exception) -> Response:
    logger.error("%s [%s] failed: %r", request.url.path, request.method, error)  # Starlette logs the traceback
    return error_response(500, "internal error; see the service log")


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, error: RequestValidationError) -> Response:
    return error_response(400, "; ".join(str(e.get("msg")) for e in error.errors()) or "invalid request")


async def _body(request: Request, json: bool = True, any_content_type: bool = False) -> bytes:
    """The request body, refused early when it is over MAX_BODY_BYTES or (for JSON routes) not JSON."""
    return await _read_body(
        None if any_content_type else request.headers.get("content-type", ""),
        request.headers.get("content-length"),
        request.stream(),
        _settings(request).max_body_bytes,
        json,
    )


def _check_json_body(content_type: str | None, body: bytes | None) -> None:
    """``content_type`` None: any Content-Type is read as JSON (TensorFlow Serving's REST API ignores the
    header, and its own clients — ``requests.post(url, data=...)``, ``curl -d`` — send none or a form type)."""
    content_type = content_type.split(";")[0].strip().lower() if content_type is not None else "application/json"
    if content_type != "application/json":
        raise UnsupportedMediaType(f"unsupported content type {content_type or '(none)'}; send application/json")
    if body is not None and not body:
        raise InputError("empty request body; send JSON")


async def _read_body(content_type: str | None, length: str | None, chunks: AsyncIterator[bytes], limit: int, json: bool) -> bytes:
    if json:
        _check_json_body(content_type, None)
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


def _json(content: Any, prediction: Prediction | None = None) -> Response:
    headers = {"X-Model-Version": prediction.model.version} if prediction else {}
    if isinstance(content, Encoded):
        return Response(content.payload, media_type=content.media_type, headers={**headers, **dict(content.headers)})
    return Response(orjson.dumps(content), media_type="application/json", headers=headers)


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


@app.post("/predict")
async def predict(request: Request) -> Response:
    """One image (28 rows of 28 integers 0-255), a list of images, or {"b64": base64 of N*784 raw uint8
    pixels} -> per image the digit, its 10 probabilities and the model version. Batched with every
    other route's requests."""
    return _json(*await predict_json(await _body(request), _core(request), _settings(request).max_images_per_request))


@app.post("/predict_image")
async def predict_image(request: Request) -> Response:
    """An uploaded picture of a digit (multipart field `image`, or the raw image as the body)."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("image") or form.get("file")
        if upload is None or isinstance(upload, str):
            raise InputError("multipart upload needs a file field named 'image'")
        data = await upload.read()
    elif content_type.startswith(("image/", "application/octet-stream")):
        data = await _body(request, json=False)
    else:
        raise UnsupportedMediaType(
            f"unsupported content type {content_type or '(none)'}; upload "
            "multipart/form-data with an 'image' file, or send image/* bytes"
        )
    settings = _settings(request)
    async with request.app.state.image_decodes:  # bounds the memory a burst of big pictures can take
        pixels = await asyncio.to_thread(pixels_from_image_bytes, data, settings.max_image_pixels)
    prediction = await _core(request).predict(pixels[None], "http_image")
    return _json({**answers(prediction)[0], "pixels": pixels.tolist()}, prediction)


@app.post("/feedback", status_code=201)
async def feedback(request: Request) -> Response:
    """A user's verdict on an answer: ``{"pixels": the 28x28 the model saw, "predicted": d, "label": d,
    "model_version": v}``, stored for review and training (FEEDBACK=on; 404 when off). 429 past
    FEEDBACK_PER_MINUTE per client, 507 when FEEDBACK_DIR holds FEEDBACK_MAX_BYTES."""
    store = getattr(request.app.state, "feedback", None)
    if store is None:
        return error_response(404, "feedback is off on this server (FEEDBACK=on turns it on)")
    pixels, predicted, label, version = parse_feedback(parsed_json(await _body(request)))
    client = request.client.host if request.client else "unknown"
    await asyncio.to_thread(store.add, client, pixels, predicted, label, version)
    feedback_received(version, predicted == label)
    return Response(orjson.dumps({"stored": True, "right": predicted == label}), status_code=201, media_type="application/json")


@app.get("/draw", response_class=HTMLResponse)
def draw() -> HTMLResponse:
    """A page to draw a digit on and see what the model makes of it."""
    return HTMLResponse(DRAW_PAGE)


@app.get("/draw.css", include_in_schema=False)
def draw_css() -> Response:
    content, media_type = DRAW_ASSETS["draw.css"]
    return Response(content, media_type=media_type)


@app.get("/draw.js", include_in_schema=False)
def draw_js() -> Response:
    content, media_type = DRAW_ASSETS["draw.js"]
    return Response(content, media_type=media_type)


@app.get("/model")
def model(request: Request) -> Response:
    """Name, version, alias, MLflow run id, test accuracy and load time of the model being served, and
    how this worker runs it (precision, why, TensorFlow's threads)."""
    core = _core(request)
    runtime, (intra, inter) = core.runtime, request.app.state.threads
    compute = {
        "requested_precision": runtime.precision,
        "precision_reason": runtime.precision_reason,
        "intra_op_threads": intra,
        "inter_op_threads": inter,
    }
    answer = {**core.model().info.as_dict(), "compute": compute}
    if isinstance(core, Rollout):
        challenger = core.challenger.runtime if core.challenger else None
        answer["challenger"] = {
            "mode": core.mode,
            "canary_percent": core.canary_percent if core.mode == "canary" else None,
            "model_uri": challenger.model_uri if challenger else None,
            **(challenger.current.info.as_dict() if challenger and challenger.ready else {"version": None}),
        }
    return _json(answer)


class FailedAttempts:
    """Failed admin logins per client address: past ``limit`` within ``window_s``, refuse for the window."""

    def __init__(self, limit: int = 5, window_s: float = 60.0) -> None:
        self.limit, self.window_s = limit, window_s
        self._times: dict[str, deque[float]] = defaultdict(deque)

    def retry_after(self, client: str) -> int:
        """Seconds until ``client`` may try again (0: now)."""
        times, now = self._times[client], time.monotonic()
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            self._times.pop(client, None)
        return int(times[0] + self.window_s - now) + 1 if len(times) >= self.limit else 0

    def failed(self, client: str) -> None:
        self._times[client].append(time.monotonic())


ADMIN_ATTEMPTS = FailedAttempts()


@app.post("/admin/reload")
def reload(request: Request) -> Response:
    """Load the version MODEL_URI points at now (Authorization: Bearer $ADMIN_TOKEN).

    401 on a missing or wrong token; after 5 failures from one address in a minute, 429 for the rest
    of that minute. 503 when the registry cannot be reached (within REGISTRY_TIMEOUT_S), 409 when the
    new version cannot be loaded; the previous model keeps serving either way.
    """
    token = _settings(request).admin_token
    if not token:
        return error_response(404, "admin endpoints are off (set ADMIN_TOKEN to enable them)")
    client = request.client.host if request.client else "unknown"
    wait = ADMIN_ATTEMPTS.retry_after(client)
    if wait:
        response = error_response(429, f"too many failed admin attempts from {client}; retry in {wait} s")
        response.headers["Retry-After"] = str(wait)
        return response
    scheme, _, supplied = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(supplied.strip().encode(), token.encode()):
        ADMIN_ATTEMPTS.failed(client)
        response = error_response(401, "missing or wrong token; send Authorization: Bearer <ADMIN_TOKEN>")
        response.headers["WWW-Authenticate"] = "Bearer"
        return response
    try:
        old, new = _core(request).runtime.reload()
    except RegistryUnavailable as exc:
        return error_response(503, f"reload failed, still serving the previous model: {exc}")
    except ModelLoadError as exc:
        return error_response(409, f"reload failed, still serving the previous model: {exc}")
    return _json(
        {
            "previous_version": old.version if old else None,
            "version": new.version,
            "changed": old is None or old.version != new.version,
        }
    )


@app.post("/admin/registry-events")
async def registry_event(request: Request) -> Response:
    """MLflow registry webhooks (``model_version_alias.created``/``.deleted``, signed with WEBHOOK_SECRET):
    when the alias this service follows moves, reload now in this worker and tell the others. 404 when
    WEBHOOK_SECRET is unset; 401 unsigned or wrongly signed, 400 stale or malformed, 409 a replayed delivery."""
    webhooks = getattr(request.app.state, "webhooks", None)
    if webhooks is None:
        return error_response(404, "registry webhooks are off (set WEBHOOK_SECRET to enable them)")
    verifier, siblings = webhooks
    body = await _body(request)
    event = verifier.verify(body, {name.lower(): value for name, value in request.headers.items()})
    core = _core(request)
    runtimes = [core.runtime] + ([core.challenger.runtime] if isinstance(core, Rollout) and core.challenger else [])
    moved = [runtime for runtime in runtimes if _follows(runtime.model_uri, event)]
    if not moved:
        followed = ", ".join(runtime.model_uri for runtime in runtimes)
        return _json({"reloaded": False, "reason": f"not about {followed}", "event": f"{event.entity}.{event.action}"})
    siblings.notify()
    answers = []
    for runtime in moved:
        try:
            old, new = await asyncio.to_thread(runtime.reload)
            previous = old.version if old else None
            answers.append({"model_uri": runtime.model_uri, "previous_version": previous, "version": new.version})
        except (RegistryUnavailable, ModelLoadError) as exc:
            answers.append({"model_uri": runtime.model_uri, "error": f"still serving the previous model: {exc}"})
    return _json({"reloaded": all("version" in answer for answer in answers), "models": answers})


def _follows(model_uri: str, event: RegistryEvent) -> bool:
    if not model_uri.startswith("models:/"):
        return False
    name, alias, _ = parse_registry_uri(model_uri)
    return alias is not None and event.moves(name, alias)


# TensorFlow Serving REST API (https://www.tensorflow.org/tfx/serving/api_rest)


def _version(route: tfserving.ModelRoute, core: ServingCore) -> str | None:
    """The version a REST path pins: ``/versions/N``, ``/labels/<label>``, or None for the served one."""
    return tfserving.version_for_label(route.label, core.model().info) if route.label else route.version


def _model_route(model_path: str, method: str, verbs: tuple[str | None, ...]) -> tfserving.ModelRoute:
    route = tfserving.parse_model_path(model_path)
    if route is None or route.name != tfserving.MODEL_NAME or route.verb not in verbs:
        raise NotFound(f"no such endpoint: {method} /v1/models/{model_path}")
    return route


@app.post("/v1/models/{model_path:path}")
async def tf_predict(model_path: str, request: Request) -> Response:
    """TF Serving predict: {"instances": [...]} -> {"predictions": [...]}, {"inputs": ...} -> {"outputs": ...}."""
    route = _model_route(model_path, "POST", ("predict", "classify", "regress"))
    if route.verb != "predict":
        raise tfserving.wrong_method(route.verb)
    body = await _body(request, any_content_type=True)
    core = _core(request)
    return _json(*await predict_tf_rest(body, core, _settings(request).max_images_per_request, _version(route, core)))


@app.get("/v1/models/{model_path:path}")
def tf_status(model_path: str, request: Request) -> Response:
    """TF Serving model status, or its signature def with /metadata."""
    route = _model_route(model_path, "GET", (None, "metadata"))
    core = _core(request)
    served = core.model(_version(route, core))
    if route.verb == "metadata":
        return _json(tfserving.rest_metadata_response(served.info.version, served.signature_defs))
    return _json(tfserving.rest_status_response(served.info.version))


# Open Inference Protocol (V2) REST (https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/)


@app.get("/v2")
def v2_server_metadata() -> Response:
    """V2 server metadata: name, version, protocol extensions."""
    return _json(open_inference.server_metadata())


@app.get("/v2/health/live")
def v2_live() -> Response:
    return _json({"live": True})


@app.get("/v2/health/ready")
def v2_ready(request: Request) -> Response:
    """200 when a model is loaded, else 503 (as KServe's servers answer)."""
    _core(request).model()
    return _json({"ready": True})


def _v2_route(model_path: str, method: str, verbs: tuple[str | None, ...]) -> open_inference.ModelRoute:
    route = open_inference.parse_model_path(model_path)
    if route is None or route.verb not in verbs:
        raise NotFound(f"no such endpoint: {method} /v2/models/{model_path}")
    open_inference.check_model(route.name)
    return route


@app.get("/v2/models/{model_path:path}")
def v2_model(model_path: str, request: Request) -> Response:
    """V2 model metadata, or with /ready the model's readiness (200, or 503 before it is loaded)."""
    route = _v2_route(model_path, "GET", (None, "ready"))
    served = _core(request).model(route.version)
    if route.verb == "ready":
        return _json({"name": route.name, "ready": True})
    return _json(open_inference.model_metadata(served.info.version))


@app.post("/v2/models/{model_path:path}")
async def v2_infer(model_path: str, request: Request) -> Response:
    """V2 inference: JSON tensors, or the binary tensor extension (Inference-Header-Content-Length)."""
    route = _v2_route(model_path, "POST", ("infer",))
    body = await _body(request, any_content_type=True)
    max_images = _settings(request).max_images_per_request
    header_length = request.headers.get(open_inference.HEADER_LENGTH)
    return _json(*await infer_v2(body, _core(request), max_images, route.version, header_length))


# -- the hot path ---------------------------------------------------------------------------------

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
_JSON_HEADER = (b"content-type", b"application/json")


class HotRoutes:
    """Raw ASGI for ``POST /predict``, ``/v1/models/mnist:predict`` and ``/v2/models/mnist/infer``, in front of the routers.

    These are the routes called thousands of times a second. Starlette's router, FastAPI's request
    handling and their exception middlewares cost about a fifth of a worker's time per request
    (py-spy, docs/performance.md), so these skip them and answer here, through the same
    handlers as the FastAPI routes above (which still document them and serve every other path).
    BentoML's own middlewares (metrics, concurrency limit, timeout) still run before this one.
    """

    def __init__(self, app: Callable, skip: tuple[str, ...] = ()) -> None:
        self.app = app
        self.routes = {path: handler for path, handler in HOT_ROUTES.items() if path not in skip}

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        handler = self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if handler is None:
            return await self.app(scope, receive, send)
        settings, core = app.state.settings, app.state.core
        headers = dict(scope["headers"])
        try:
            content_type = None if scope["path"] in ANY_CONTENT_TYPE else headers.get(b"content-type", b"").decode("latin-1")
            body = scope.get("digits.body")  # what the edge read, within its limits
            if body is None:
                body = await _read_body(
                    content_type, _latin1(headers.get(b"content-length")), _chunks(receive), settings.max_body_bytes, json=True
                )
            else:
                _check_json_body(content_type, body)
            canary_key = headers.get(b"x-canary-key")
            token = CANARY_KEY.set(canary_key.decode("latin-1")) if canary_key else None
            try:
                content, prediction = await handler(body, headers, core, settings.max_images_per_request)
            finally:
                if token is not None:
                    CANARY_KEY.reset(token)
            status, content_type = 200, _JSON_HEADER
            extra = [(b"x-model-version", prediction.model.version.encode())]
            if isinstance(content, Encoded):
                payload, content_type = content.payload, (b"content-type", content.media_type.encode())
                extra += [(name.encode(), value.encode()) for name, value in content.headers]
            else:
                payload = orjson.dumps(content)
        except ClientDisconnect:
            return
        except ServiceError as error:
            client_errors.warning("%s [POST] answered %d: %s", scope["path"], error.http_status, error)
            status, payload, extra, content_type = error.http_status, error_body(str(error)), [], _JSON_HEADER
        except Exception:
            logger.exception("%s [POST] failed", scope["path"])
            status, payload, extra, content_type = 500, error_body("internal error; see the service log"), [], _JSON_HEADER
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [content_type, (b"content-length", str(len(payload)).encode()), *extra],
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
