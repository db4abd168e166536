"""TensorFlow Serving's protocols for the ``mnist`` model: requests in, answers out, typed errors.

REST (https://www.tensorflow.org/tfx/serving/api_rest): row format ``{"instances": [...]}`` ->
``{"predictions": [...]}``, columnar ``{"inputs": ...}`` -> ``{"outputs": ...}``, model status and
metadata. gRPC: ``PredictRequest``/``PredictResponse``, ``GetModelMetadata`` and ``GetModelStatus``
messages from ``tensorflow_serving.apis``. Nothing here sends or receives: the HTTP and gRPC fronts do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, model_pb2, predict_pb2

from contract import IMAGE_SHAPE, SIGNATURE
from contract import SERVABLE_NAME as MODEL_NAME
from service.errors import InputError, NotFound, SignatureNotFound
from service.inputs import checked_pixels, parsed_json, pixels_from_json, plain_integer_images
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

    signature_map = MessageToDict(
        _signature_map(signature_defs), preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return {
        "model_spec": {"name": MODEL_NAME, "signature_name": "", "version": version},
        "metadata": {"signature_def": signature_map},
    }


# -- gRPC messages ----------------------------------------------------------------------------------


def requested_version(spec: model_pb2.ModelSpec, serving: ModelInfo) -> str | None:
    """The version a ``ModelSpec`` pins (None: the served one); NotFound for another model or signature."""
    if spec.name != MODEL_NAME:
        raise NotFound(
            f"Servable not found for request: Latest({spec.name or '(empty model name)'}); this server serves {MODEL_NAME!r}"
        )
    if spec.signature_name not in ("", SIGNATURE.name):
        raise SignatureNotFound(f'Serving signature key "{spec.signature_name}" not found.')
    if spec.HasField("version"):
        return str(spec.version.value)
    if spec.version_label:
        return version_for_label(spec.version_label, serving)
    return None


_TENSOR_VALUES = {  # dtype -> (numpy dtype, the repeated field TensorProto keeps its values in)
    types_pb2.DT_UINT8: (np.uint8, "int_val"),
    types_pb2.DT_INT32: (np.int32, "int_val"),
    types_pb2.DT_INT64: (np.int64, "int64_val"),
    types_pb2.DT_FLOAT: (np.float32, "float_val"),
    types_pb2.DT_DOUBLE: (np.float64, "double_val"),
}


def pixels_from_predict_request(request: predict_pb2.PredictRequest, max_images: int) -> np.ndarray:
    """The ``pixels`` input of a ``PredictRequest`` as uint8 ``[N, 28, 28]``, strictly checked."""
    if set(request.inputs) != {INPUT_NAME}:
        names = ", ".join(sorted(request.inputs)) or "none"
        raise InputError(f'inputs must be exactly {{"{INPUT_NAME}"}} (the signature\'s input), got: {names}')
    for name in request.output_filter:
        if name not in OUTPUT_NAMES:
            raise InputError(f"output_filter names {name!r}; the signature's outputs are {', '.join(OUTPUT_NAMES)}")
    tensor = request.inputs[INPUT_NAME]
    if tensor.dtype not in _TENSOR_VALUES:
        raise InputError(
            f"{INPUT_NAME} has dtype {types_pb2.DataType.Name(tensor.dtype)}; "
            "send DT_UINT8 (or DT_FLOAT/DT_DOUBLE/DT_INT32/DT_INT64 holding integers 0-255)"
        )
    shape = [dim.size for dim in tensor.tensor_shape.dim]
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3 or tuple(shape[1:]) != IMAGE_SHAPE or shape[0] < 0:
        raise InputError(
            f"{INPUT_NAME} has shape {[d.size for d in tensor.tensor_shape.dim]}; expected [N, 28, 28] or [N, 28, 28, 1]"
        )
    if shape[0] == 0:
        raise InputError(f"{INPUT_NAME} holds no images; send at least one 28x28 image")
    if shape[0] > max_images:
        raise InputError(f"{INPUT_NAME} has {shape[0]} images; at most {max_images} per request")
    dtype, field = _TENSOR_VALUES[tensor.dtype]
    count = shape[0] * IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
    if tensor.tensor_content:
        values = (
            np.frombuffer(tensor.tensor_content, dtype=dtype)
            if len(tensor.tensor_content) == count * np.dtype(dtype).itemsize
            else None
        )
    else:
        values = np.asarray(getattr(tensor, field), dtype=dtype) if len(getattr(tensor, field)) == count else None
    if values is None:
        raise InputError(f"{INPUT_NAME} holds a different number of values than its shape {shape} needs ({count})")
    return checked_pixels(values.reshape(shape), max_images, INPUT_NAME)


def _tensor(array: np.ndarray, dtype: int) -> tensor_pb2.TensorProto:
    """Values in the typed field (``float_val``, ``int64_val``), as TensorFlow Serving answers by default:
    its example clients and tests read ``.float_val``; ``tensor_content`` is its opt-in
    (``--enable_serialization_as_tensor_content``). ``tf.make_ndarray`` reads both."""
    shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=s) for s in array.shape])
    tensor = tensor_pb2.TensorProto(dtype=dtype, tensor_shape=shape)
    getattr(tensor, "float_val" if dtype == types_pb2.DT_FLOAT else "int64_val").extend(array.ravel().tolist())
    return tensor


def predict_response(prediction: Prediction, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
    response = predict_pb2.PredictResponse()
    _fill_spec(response.model_spec, prediction.model.version)
    wanted = set(request.output_filter) or set(OUTPUT_NAMES)
    if SIGNATURE.probabilities in wanted:
        response.outputs[SIGNATURE.probabilities].CopyFrom(
            _tensor(prediction.probabilities.astype(np.float32, copy=False), types_pb2.DT_FLOAT)
        )
    if SIGNATURE.digit in wanted:
        response.outputs[SIGNATURE.digit].CopyFrom(_tensor(prediction.digits.astype(np.int64, copy=False), types_pb2.DT_INT64))
    return response


def metadata_response(
    request: get_model_metadata_pb2.GetModelMetadataRequest, version: str, signature_defs: dict[str, Any]
) -> get_model_metadata_pb2.GetModelMetadataResponse:
    fields = list(request.metadata_field) or ["signature_def"]
    if fields != ["signature_def"]:
        raise InputError(f"metadata_field {fields}: only 'signature_def' is available")
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    _fill_spec(response.model_spec, version)
    response.model_spec.signature_name = ""
    response.metadata["signature_def"].Pack(_signature_map(signature_defs))
    return response


def status_response(version: str) -> get_model_status_pb2.GetModelStatusResponse:
    response = get_model_status_pb2.GetModelStatusResponse()
    status = response.model_version_status.add()
    status.version = int(version)
    status.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
    return response


def _fill_spec(spec: model_pb2.ModelSpec, version: str) -> None:
    spec.name = MODEL_NAME
    spec.version.value = int(version)
    spec.signature_name = SIGNATURE.name


def _signature_map(signature_defs: dict[str, Any]) -> get_model_metadata_pb2.SignatureDefMap:
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for name, signature_def in signature_defs.items():
        signature_map.signature_def[name].CopyFrom(signature_def)
    return signature_map
