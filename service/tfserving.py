"""TensorFlow Serving's protocols for the ``mnist`` model: requests in, answers out, typed errors.

REST (https://www.tensorflow.org/tfx/serving/api_rest): row format ``{"instances": [...]}`` ->
``{"predictions": [...]}``, columnar ``{"inputs": ...}`` -> ``{"outputs": ...}``, model status and
metadata, and the model paths both protocols share. The gRPC messages are in
:mod:`service.tfserving_grpc`: their classes import all of TensorFlow, which the HTTP side (and BentoML's
main process, which never serves) does without. Nothing here sends or receives: the HTTP and gRPC fronts do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from contract import SERVABLE_NAME as MODEL_NAME
from contract import SIGNATURE
from service.errors import InputError
from service.inputs import parsed_json, pixels_from_json, plain_integer_images
from service.runtime import ModelInfo, Prediction

INPUT_NAME = SIGNATURE.input
OUTPUT_NAMES = SIGNATURE.outputs
_PATH = re.compile(
    r"^(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
    r"(?:(?::(?P<verb>predict|classify|regress))|/(?P<meta>metadata))?$"
)


# -- REST -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRoute:
    name: str
    version: str | None
    verb: str | None  # predict | classify | regress | metadata | None (status)
    label: str | None = None  # .../labels/<label>: a version label, resolved by :func:`version_for_label`


def parse_model_path(path: str) -> ModelRoute | None:
    match = _PATH.match(path)
    if not match:
        return None
    return ModelRoute(match["name"], match["version"], match["verb"] or match["meta"], match["label"])


def wrong_method(method: str) -> InputError:
    """What TF Serving answers (INVALID_ARGUMENT, HTTP 400) to Classify, Regress or MultiInference on a model
    whose signature is a predict signature."""
    kind = {"classify": "classification", "regress": "regression"}.get(method.lower())
    if kind is None:
        return InputError("Unsupported signature method_name: tensorflow/serving/predict")
    return InputError(
        f"Expected {kind} signature method_name to be tensorflow/serving/{method.lower()}. Was: tensorflow/serving/predict"
    )


def version_for_label(label: str, serving: ModelInfo) -> str:
    """The version a version label names: this server follows one registry alias, so that alias names the
    version it serves; any other label is TensorFlow Serving's INVALID_ARGUMENT (HTTP 400)."""
    if label != serving.alias:
        raise InputError(
            f"Unrecognized servable version label: {label} (this server follows {serving.alias or 'a fixed version'})"
        )
    return serving.version


def parse_rest_predict(body: bytes, max_images: int) -> tuple[np.ndarray, bool]:
    """A REST predict body -> (uint8 pixels ``[N, 28, 28]``, whether the request was columnar)."""
    pixels = _plain_instances(body, max_images)
    if pixels is not None:
        return pixels, False
    request = parsed_json(body)
    if not isinstance(request, dict):
        raise InputError('request body must be a JSON object with "instances" or "inputs"')
    signature = request.get("signature_name", SIGNATURE.name)
    if signature != SIGNATURE.name:
        raise InputError(f'Serving signature name: "{signature}" not found in signature def')
    if ("instances" in request) == ("inputs" in request):
        raise InputError('JSON object must have exactly one of "instances" (row format) or "inputs" (columnar format)')
    if "instances" in request:
        instances = request["instances"]
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
    inputs = request["inputs"]
    if isinstance(inputs, dict) and set(inputs) != {"b64"}:
        if set(inputs) != {INPUT_NAME}:
            raise InputError(f'"inputs" object must have exactly the key "{INPUT_NAME}"')
        inputs = inputs[INPUT_NAME]
    return pixels_from_json(inputs, max_images, "inputs"), True


def _plain_instances(body: bytes, max_images: int) -> np.ndarray | None:
    """``{"instances": [image, ...]}`` with plain integer images, read without a JSON parser
    (:func:`service.inputs.plain_integer_images`); None for any other body."""
    head, bracket, rest = body.partition(b"[")
    if head.translate(None, b" \t\r\n") != b'{"instances":':
        return None
    rest = rest.rstrip()
    if not rest.endswith(b"}"):
        return None
    return plain_integer_images(bracket + rest[:-1], max_images, list_only=True)


def rest_predict_response(prediction: Prediction, columnar: bool) -> dict[str, Any]:
    probabilities, digits = prediction.probabilities.tolist(), prediction.digits.tolist()
    if columnar:
        return {"outputs": {SIGNATURE.probabilities: probabilities, SIGNATURE.digit: digits}}
    return {"predictions": [{SIGNATURE.probabilities: p, SIGNATURE.digit: d} for p, d in zip(probabilities, digits, strict=True)]}


def rest_status_response(version: str) -> dict[str, Any]:
    return {
        "model_version_status": [{"version": version, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]
    }


def rest_metadata_response(version: str, signature_defs: dict[str, Any]) -> dict[str, Any]:
    """As TF Serving's REST API: every signature def, default-valued fields printed too."""
    from google.protobuf.json_format import MessageToDict

    signature_map = {
        "signature_def": {
            name: MessageToDict(signature_def, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
            for name, signature_def in signature_defs.items()
        }
    }
    return {
        "model_spec": {"name": MODEL_NAME, "signature_name": "", "version": version},
        "metadata": {"signature_def": signature_map},
    }
