"""TensorFlow Serving's REST protocol for the ``mnist`` model: request parsing and response shapes.

Follows https://www.tensorflow.org/tfx/serving/api_rest: row format ``{"instances": [...]}`` ->
``{"predictions": [...]}``, columnar ``{"inputs": ...}`` -> ``{"outputs": ...}``, model status and
metadata (the signature def), errors as ``{"error": "..."}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from starlette.responses import JSONResponse

from service.inputs import InputError, pixels_from_json

MODEL_NAME = "mnist"
INPUT_NAME = "pixels"
SIGNATURE = "serving_default"
_PATH = re.compile(r"^(?P<name>[^/:]+)(?:/versions/(?P<version>\d+))?(?:(?::(?P<verb>predict|classify|regress))|/(?P<meta>metadata))?$")


@dataclass(frozen=True)
class ModelRoute:
    name: str
    version: str | None
    verb: str | None  # predict | metadata | None (status)


def parse_model_path(path: str) -> ModelRoute | None:
    match = _PATH.match(path)
    if not match:
        return None
    return ModelRoute(match["name"], match["version"], match["verb"] or match["meta"])


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def parse_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InputError(f"malformed JSON: {exc}") from None


def parse_predict_request(body: Any, max_images: int) -> tuple[np.ndarray, bool]:
    """Returns (uint8 pixels [N, 28, 28], whether the request was columnar)."""
    if not isinstance(body, dict):
        raise InputError('request body must be a JSON object with "instances" or "inputs"')
    signature = body.get("signature_name", SIGNATURE)
    if signature != SIGNATURE:
        raise InputError(f"Serving signature name: \"{signature}\" not found in signature def")
    if ("instances" in body) == ("inputs" in body):
        raise InputError('JSON object must have exactly one of "instances" (row format) or "inputs" (columnar format)')
    if "instances" in body:
        instances = body["instances"]
        if not isinstance(instances, list) or not instances:
            raise InputError('"instances" must be a non-empty list')
        named = [isinstance(instance, dict) for instance in instances]
        if any(named) and not all(named):
            raise InputError("instances must all be images or all be objects keyed by input name")
        if all(named):
            if not all(set(instance) == {INPUT_NAME} for instance in instances):
                raise InputError(f'each instance object must have exactly the key "{INPUT_NAME}"')
            instances = [instance[INPUT_NAME] for instance in instances]
        pixels = pixels_from_json(instances, max_images, "instances")
        if len(pixels) != len(instances):
            raise InputError("each instance must be one 28x28 image (instances has shape [28, 28], not [N, 28, 28])")
        return pixels, False
    inputs = body["inputs"]
    if isinstance(inputs, dict) and set(inputs) != {"b64"}:
        if set(inputs) != {INPUT_NAME}:
            raise InputError(f'"inputs" object must have exactly the key "{INPUT_NAME}"')
        inputs = inputs[INPUT_NAME]
    return pixels_from_json(inputs, max_images, "inputs"), True


def predict_response(probabilities: np.ndarray, digits: np.ndarray, columnar: bool) -> dict[str, Any]:
    if columnar:
        return {"outputs": {"probabilities": probabilities.tolist(), "digit": digits.tolist()}}
    return {"predictions": [
        {"probabilities": p, "digit": d} for p, d in zip(probabilities.tolist(), digits.tolist())
    ]}


def status_response(version: str) -> dict[str, Any]:
    return {"model_version_status": [
        {"version": version, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
    ]}


def metadata_response(version: str, signature_def: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict
    from tensorflow_serving.apis import get_model_metadata_pb2

    signature_map = get_model_metadata_pb2.SignatureDefMap()
    signature_map.signature_def[SIGNATURE].CopyFrom(signature_def)
    return {
        "model_spec": {"name": MODEL_NAME, "signature_name": "", "version": version},
        "metadata": {"signature_def": MessageToDict(signature_map, preserving_proto_field_name=True)},
    }
