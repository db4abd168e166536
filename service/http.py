"""The HTTP routes users call: thin handlers that read a body once, call a protocol module and the
serving core. Every error answers ``{"error": message}``.

Mounted into the BentoML service at ``/`` (see :mod:`service.service`), which adds the admin routes
(:mod:`service.admin`) and sets ``app.state.core`` and ``app.state.settings`` when a worker starts. The
three prediction routes are answered before any router by :class:`service.hot_path.HotRoutes`, through
the same handlers; their routes here document them (OpenAPI) and answer only if that front is off.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse, Response

from service import open_inference, tfserving
from service.core import ServingCore
from service.errors import (
    InputError,
    NotFound,
    ServiceError,
    UnsupportedMediaType,
    error_response,
    response_for,
)
from service.feedback import parse_feedback
from service.hot_path import Encoded, answers, client_errors, infer_v2, logger, predict_json, predict_tf_rest, read_body
from service.inputs import parsed_json, pixels_from_image_bytes
from service.metrics import feedback_received
from service.rollout import Rollout
from service.runtime import Prediction

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


def core_of(request: Request) -> ServingCore:
    return request.app.state.core


def settings_of(request: Request) -> Any:
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


async def body_of(request: Request, json: bool = True, any_content_type: bool = False) -> bytes:
    """The request body, refused early when it is over MAX_BODY_BYTES or (for JSON routes) not JSON."""
    return await read_body(
        None if any_content_type else request.headers.get("content-type", ""),
        request.headers.get("content-length"),
        request.stream(),
        settings_of(request).max_body_bytes,
        json,
    )


def json_response(content: Any, prediction: Prediction | None = None) -> Response:
    headers = {"X-Model-Version": prediction.model.version} if prediction else {}
    if isinstance(content, Encoded):
        return Response(content.payload, media_type=content.media_type, headers={**headers, **dict(content.headers)})
    return Response(orjson.dumps(content), media_type="application/json", headers=headers)


@app.post("/predict")  # reached only without HotRoutes (see the module's docstring)
async def predict(request: Request) -> Response:
    """One image (28 rows of 28 integers 0-255), a list of images, or {"b64": base64 of N*784 raw uint8
    pixels} -> per image the digit, its 10 probabilities and the model version. Batched with every
    other route's requests."""
    max_images = settings_of(request).max_images_per_request
    return json_response(*await predict_json(await body_of(request), core_of(request), max_images))


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
        data = await body_of(request, json=False)
    else:
        raise UnsupportedMediaType(
            f"unsupported content type {content_type or '(none)'}; upload "
            "multipart/form-data with an 'image' file, or send image/* bytes"
        )
    settings = settings_of(request)
    async with request.app.state.image_decodes:  # bounds the memory a burst of big pictures can take
        pixels = await asyncio.to_thread(pixels_from_image_bytes, data, settings.max_image_pixels)
    prediction = await core_of(request).predict(pixels[None], "http_image")
    return json_response({**answers(prediction)[0], "pixels": pixels.tolist()}, prediction)


@app.post("/feedback", status_code=201)
async def feedback(request: Request) -> Response:
    """A user's verdict on an answer: ``{"pixels": the 28x28 the model saw, "predicted": d, "label": d,
    "model_version": v}``, stored for review and training (FEEDBACK=on; 404 when off). 429 past
    FEEDBACK_PER_MINUTE per client, 507 when FEEDBACK_DIR holds FEEDBACK_MAX_BYTES."""
    store = getattr(request.app.state, "feedback", None)
    if store is None:
        return error_response(404, "feedback is off on this server (FEEDBACK=on turns it on)")
    pixels, predicted, label, version = parse_feedback(parsed_json(await body_of(request)))
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
    core = core_of(request)
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
    return json_response(answer)


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
    body = await body_of(request, any_content_type=True)
    core = core_of(request)
    return json_response(*await predict_tf_rest(body, core, settings_of(request).max_images_per_request, _version(route, core)))


@app.get("/v1/models/{model_path:path}")
def tf_status(model_path: str, request: Request) -> Response:
    """TF Serving model status, or its signature def with /metadata."""
    route = _model_route(model_path, "GET", (None, "metadata"))
    core = core_of(request)
    served = core.model(_version(route, core))
    if route.verb == "metadata":
        return json_response(tfserving.rest_metadata_response(served.info.version, served.signature_defs))
    return json_response(tfserving.rest_status_response(served.info.version))


# Open Inference Protocol (V2) REST (https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/)


@app.get("/v2")
def v2_server_metadata() -> Response:
    """V2 server metadata: name, version, protocol extensions."""
    return json_response(open_inference.server_metadata())


@app.get("/v2/health/live")
def v2_live() -> Response:
    return json_response({"live": True})


@app.get("/v2/health/ready")
def v2_ready(request: Request) -> Response:
    """200 when a model is loaded, else 503 (as KServe's servers answer)."""
    core_of(request).model()
    return json_response({"ready": True})


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
    served = core_of(request).model(route.version)
    if route.verb == "ready":
        return json_response({"name": route.name, "ready": True})
    return json_response(open_inference.model_metadata(served.info.version))


@app.post("/v2/models/{model_path:path}")
async def v2_infer(model_path: str, request: Request) -> Response:
    """V2 inference: JSON tensors, or the binary tensor extension (Inference-Header-Content-Length)."""
    route = _v2_route(model_path, "POST", ("infer",))
    body = await body_of(request, any_content_type=True)
    max_images = settings_of(request).max_images_per_request
    header_length = request.headers.get(open_inference.HEADER_LENGTH)
    return json_response(*await infer_v2(body, core_of(request), max_images, route.version, header_length))
