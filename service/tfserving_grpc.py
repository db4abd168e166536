"""TensorFlow Serving's gRPC messages for the ``mnist`` model: ``PredictRequest``/``PredictResponse``,
``GetModelMetadata`` and ``GetModelStatus`` from ``tensorflow_serving.apis``, to and from arrays, with
typed errors. Kept apart from :mod:`service.tfserving` (REST) because importing these message classes
imports all of TensorFlow (``tensorflow.core.framework``), ~10 s of CPU that only a serving worker needs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, model_pb2, predict_pb2

from contract import IMAGE_SHAPE, SIGNATURE
from service.errors import InputError, NotFound, SignatureNotFound
from service.inputs import checked_pixels
from service.runtime import ModelInfo, Prediction
from service.tfserving import INPUT_NAME, MODEL_NAME, OUTPUT_NAMES, version_for_label


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
