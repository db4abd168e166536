"""The Digits service: thin HTTP declarations over :mod:`service.runtime`.

    bentoml serve service:Digits --port 3000        (from the repo root; settings in README)
"""

from __future__ import annotations

import gc
import hmac
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
import orjson
from fastapi import FastAPI, Request
from pydantic import PlainValidator, ValidationError, WithJsonSchema
from starlette.concurrency import run_in_threadpool
from starlette.responses import HTMLResponse, JSONResponse

from service import tfserving
from service.inputs import InputError, pixels_from_image_bytes, pixels_from_json
from service.limits import RequestLimits, validation_message
from service.runtime import ModelLoadError, ModelRuntime, Prediction
from service.settings import SETTINGS

logger = logging.getLogger("digits")
DRAW_PAGE = (Path(__file__).parent / "static" / "draw.html").read_text()

PIXEL_BATCH_SCHEMA = {
    "description": "One image (28 rows of 28 integers 0-255), a list of such images, "
                   "or {\"b64\": base64 of N*784 raw uint8 pixels}",
    "example": [[0] * 28] * 28,
}
PixelBatch = Annotated[
    Any,
    PlainValidator(lambda value: pixels_from_json(value, SETTINGS.max_images_per_request, "request body")),
    WithJsonSchema(PIXEL_BATCH_SCHEMA),
]


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


logging.getLogger("bentoml._internal.server.http_app").addFilter(ClientErrorsWithoutTracebacks())


def _predict_signature(images: PixelBatch, /) -> list[dict[str, Any]]:
    """The shape of ``Digits.predict``, for BentoML to build its input and output models from."""
    raise NotImplementedError


class PredictInput(bentoml.IODescriptor.from_input(_predict_signature)):  # type: ignore[misc]
    """BentoML's root-input model for ``/predict``, declared JSON and parsed with orjson.

    BentoML 1.4's root models rebuild a pydantic TypeAdapter and JSON schema on every request, to
    parse the body and again to pick the media type: py-spy put that at over half the server's CPU
    under load. A declared media type and a direct parse skip both.
    """

    media_type = "application/json"

    @classmethod
    def model_validate_json(cls, json_data: str | bytes | bytearray, **kwargs: Any) -> "PredictInput":
        return cls.model_validate(orjson.loads(json_data), **kwargs)


class PredictOutput(bentoml.IODescriptor.from_output(_predict_signature)):  # type: ignore[misc]
    """BentoML's output model for ``/predict``, declared JSON and written with orjson."""

    media_type = "application/json"

    def model_dump_json(self, **kwargs: Any) -> str:
        return orjson.dumps(self.root).decode()


BATCHING = (
    {"batchable": True, "max_batch_size": SETTINGS.batch_max_size, "max_latency_ms": SETTINGS.batch_max_latency_ms}
    if SETTINGS.batching else {"batchable": False}
)

extras = FastAPI(title="Digits: model info, image upload, TensorFlow Serving REST, admin")

batch_images = bentoml.metrics.Histogram(
    name="digits_model_batch_images",
    documentation="Images per model call (after adaptive batching merged concurrent requests)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048),
)


def answers(prediction: Prediction) -> list[dict[str, Any]]:
    version = prediction.model.version
    return [
        {"digit": int(digit), "probabilities": probabilities.tolist(), "model_version": version}
        for digit, probabilities in zip(prediction.digits, prediction.probabilities)
    ]


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@bentoml.asgi_app(extras, path="/")
@bentoml.service(
    name="digits",
    workers=SETTINGS.workers,
    traffic={"timeout": SETTINGS.timeout_s, "max_concurrency": SETTINGS.max_concurrency},
    logging={"access": {"enabled": SETTINGS.access_log}},
)
class Digits:
    def __init__(self) -> None:
        self.runtime = ModelRuntime(SETTINGS.model_uri, SETTINGS.tracking_uri, SETTINGS.reload_poll_seconds)
        try:
            info = self.runtime.start()
        except ModelLoadError as exc:
            logger.critical("cannot start: no model to serve: %s", exc)
            raise SystemExit(3) from None
        logger.info("serving %s version %s (%s)", info.name, info.version, info.source)
        # TensorFlow, MLflow and BentoML leave ~0.5 M long-lived objects; a full collection walks them
        # all (~200 ms, measured), a stall every few seconds under load. Freezing them keeps the
        # collector to what requests allocate.
        gc.collect()
        gc.freeze()

    @bentoml.on_deployment
    def check_model_source() -> None:
        """Runs once in the main process before any worker: no model, no server (one clear line)."""
        try:
            found = ModelRuntime(SETTINGS.model_uri, SETTINGS.tracking_uri).check()
        except ModelLoadError as exc:
            print(f"digits: cannot start, no model to serve: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(3) from None
        print(f"digits: will serve {found} ({SETTINGS.model_uri})", file=sys.stderr, flush=True)

    def __is_ready__(self) -> bool:
        return self.runtime.ready

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self.runtime.stop()

    def _predict(self, pixels: np.ndarray) -> Prediction:
        batch_images.observe(len(pixels))
        return self.runtime.predict(pixels)

    @bentoml.api(input_spec=PredictInput, output_spec=PredictOutput, **BATCHING)
    def predict(self, images: PixelBatch, /) -> list[dict[str, Any]]:
        """Digits for one image or a list of images: per image the digit, its 10 probabilities and
        the model version. Concurrent requests are merged into one model call (adaptive batching)."""
        return answers(self._predict(images))

    @extras.post("/predict_image")
    async def predict_image(self, request: Request) -> JSONResponse:
        """An uploaded picture of a digit (multipart field `image`, or the raw image as the body)."""
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            form = await request.form()
            upload = form.get("image") or form.get("file")
            if upload is None or isinstance(upload, str):
                return error(400, "multipart upload needs a file field named 'image'")
            data = await upload.read()
        elif content_type.startswith(("image/", "application/octet-stream")):
            data = await request.body()
        else:
            return error(415, f"unsupported content type {content_type or '(none)'}; "
                              "upload multipart/form-data with an 'image' file, or send image/* bytes")
        try:
            pixels = pixels_from_image_bytes(data)
        except InputError as exc:
            return error(400, str(exc))
        prediction = await run_in_threadpool(self._predict, pixels[None])
        return JSONResponse({**answers(prediction)[0], "pixels": pixels.tolist()})

    @extras.get("/draw", response_class=HTMLResponse)
    def draw(self) -> HTMLResponse:
        """A page to draw a digit on and see what the model makes of it."""
        return HTMLResponse(DRAW_PAGE)

    @extras.get("/model")
    def model(self) -> JSONResponse:
        """Name, version, alias, MLflow run id, test accuracy and load time of the model being served."""
        if not self.runtime.ready:
            return error(503, "no model loaded yet")
        return JSONResponse(self.runtime.current.info.as_dict())

    @extras.post("/admin/reload")
    def reload(self, request: Request) -> JSONResponse:
        """Load the version MODEL_URI points at now (Authorization: Bearer $ADMIN_TOKEN)."""
        if not SETTINGS.admin_token:
            return error(404, "admin endpoints are off (set ADMIN_TOKEN to enable them)")
        supplied = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(supplied.encode(), SETTINGS.admin_token.encode()):
            return error(401, "missing or wrong bearer token")
        try:
            old, new = self.runtime.reload()
        except ModelLoadError as exc:
            return error(409, f"reload failed, still serving the previous model: {exc}")
        return JSONResponse({"previous_version": old.version if old else None, "version": new.version,
                             "changed": old is None or old.version != new.version})

    # TensorFlow Serving REST API (https://www.tensorflow.org/tfx/serving/api_rest)

    @extras.post("/v1/models/{model_path:path}")
    async def tf_predict(self, model_path: str, request: Request) -> JSONResponse:
        route = tfserving.parse_model_path(model_path)
        if route is None or route.verb != "predict" or route.name != tfserving.MODEL_NAME:
            return tfserving.error(404, f"no such endpoint: POST /v1/models/{model_path}")
        model = self.runtime.current
        if route.version is not None and route.version != model.info.version:
            return tfserving.error(404, f"Servable not found for request: Specific({route.name}, {route.version})")
        try:
            body = tfserving.parse_json(await request.body())
            pixels, columnar = tfserving.parse_predict_request(body, SETTINGS.max_images_per_request)
        except InputError as exc:
            return tfserving.error(400, str(exc))
        probabilities, digits = await run_in_threadpool(model.predict, pixels)
        batch_images.observe(len(pixels))
        return JSONResponse(tfserving.predict_response(probabilities, digits, columnar),
                            headers={"X-Model-Version": model.info.version})

    @extras.get("/v1/models/{model_path:path}")
    def tf_status(self, model_path: str) -> JSONResponse:
        route = tfserving.parse_model_path(model_path)
        if route is None or route.name != tfserving.MODEL_NAME or route.verb not in (None, "metadata"):
            return tfserving.error(404, f"no such endpoint: GET /v1/models/{model_path}")
        model = self.runtime.current
        if route.version is not None and route.version != model.info.version:
            return tfserving.error(404, f"Servable not found for request: Specific({route.name}, {route.version})")
        if route.verb == "metadata":
            return JSONResponse(tfserving.metadata_response(model.info.version, model.signature_def))
        return JSONResponse(tfserving.status_response(model.info.version))


Digits.add_asgi_middleware(RequestLimits, max_body_bytes=SETTINGS.max_body_bytes)
