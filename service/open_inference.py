"""The Open Inference Protocol ("KServe V2": KServe, Triton, MLServer, Seldon Core 2) for the ``mnist`` model.

REST (https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/): server and model
liveness, readiness and metadata, and ``POST /v2/models/mnist[/versions/N]/infer`` with JSON tensors or
the binary tensor extension (``Inference-Header-Content-Length``: a JSON header, then raw little-endian
tensor bytes). gRPC: ``inference.GRPCInferenceService`` (:mod:`service.protos.open_inference_pb2`).

The model has one input, ``pixels`` (``UINT8`` ``[-1, 28, 28]``; any integer or float datatype holding
integers 0-255 is accepted, and ``[N, 28, 28, 1]`` or ``[N, 784]`` shapes too), and two outputs,
``probabilities`` (``FP32`` ``[-1, 10]``) and ``digit`` (``INT64`` ``[-1]``). Nothing here sends or
receives: the HTTP and gRPC fronts do.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any

import numpy as np
import orjson

from contract import IMAGE_SHAPE, NUM_CLASSES, SIGNATURE
from contract import SERVABLE_NAME as MODEL_NAME
from service.errors import InputError, NotFound
from service.inputs import checked_pixels, parsed_json
from service.protos import open_inference_pb2 as pb
from service.runtime import Prediction

SERVER_NAME = "digits"
PLATFORM = "tensorflow_savedmodel"
EXTENSIONS = ("binary_tensor_data",)
HEADER_LENGTH = "inference-header-content-length"
PIXELS = SIGNATURE.input
IMAGE_VALUES = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]

# datatype -> (numpy dtype of its raw little-endian bytes, the InferTensorContents field holding it)
DATATYPES: dict[str, tuple[np.dtype, str]] = {
    "UINT8": (np.dtype("<u1"), "uint_contents"),
    "UINT16": (np.dtype("<u2"), "uint_contents"),
    "UINT32": (np.dtype("<u4"), "uint_contents"),
    "UINT64": (np.dtype("<u8"), "uint64_contents"),
    "INT8": (np.dtype("<i1"), "int_contents"),
    "INT16": (np.dtype("<i2"), "int_contents"),
    "INT32": (np.dtype("<i4"), "int_contents"),
    "INT64": (np.dtype("<i8"), "int64_contents"),
    "FP16": (np.dtype("<f2"), ""),  # raw bytes only: the protocol has no repeated field for 16-bit floats
    "FP32": (np.dtype("<f4"), "fp32_contents"),
    "FP64": (np.dtype("<f8"), "fp64_contents"),
}
OUTPUTS = {  # name -> (datatype, dtype, shape after N)
    SIGNATURE.probabilities: ("FP32", np.dtype("<f4"), (NUM_CLASSES,)),
    SIGNATURE.digit: ("INT64", np.dtype("<i8"), ()),
}
_PATH = re.compile(r"^(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?(?:/(?P<verb>infer|ready))?$")


@dataclass(frozen=True)
class ModelRoute:
    """``/v2/models/<name>[/versions/<version>][/infer|/ready]``; verb None: the model's metadata."""

    name: str
    version: str | None
    verb: str | None


def parse_model_path(path: str) -> ModelRoute | None:
    match = _PATH.match(path)
    return ModelRoute(match["name"], match["version"], match["verb"]) if match else None


def check_model(name: str) -> None:
    if name != MODEL_NAME:
        raise NotFound(f"unknown model '{name}'; this server serves '{MODEL_NAME}'")


# -- metadata -----------------------------------------------------------------------------------------


@functools.cache
def server_metadata() -> dict[str, Any]:
    try:
        version = package_version("mnist-serving")
    except PackageNotFoundError:
        version = "unknown"
    return {"name": SERVER_NAME, "version": version, "extensions": list(EXTENSIONS)}


def model_metadata(version: str) -> dict[str, Any]:
    return {
        "name": MODEL_NAME,
        "versions": [version],
        "platform": PLATFORM,
        "inputs": [{"name": PIXELS, "datatype": "UINT8", "shape": [-1, *IMAGE_SHAPE]}],
        "outputs": [{"name": name, "datatype": kind, "shape": [-1, *shape]} for name, (kind, _, shape) in OUTPUTS.items()],
    }


def grpc_model_metadata(version: str) -> pb.ModelMetadataResponse:
    return pb.ModelMetadataResponse(**model_metadata(version))


# -- infer: requests in ---------------------------------------------------------------------------------


@dataclass
class InferRequest:
    """What an infer request asks for, whatever its transport."""

    pixels: np.ndarray  # uint8 [N, 28, 28]
    id: str = ""
    outputs: list[str] = field(default_factory=lambda: list(OUTPUTS))
    binary_outputs: set[str] = field(default_factory=set)


def _pixels(name: Any, datatype: Any, shape: Any, values: np.ndarray | None, max_images: int) -> np.ndarray:
    """The one input tensor as uint8 ``[N, 28, 28]``, checked; ``values`` flat, in ``datatype``'s dtype."""
    if name != PIXELS:
        raise InputError(f"unknown input '{name}'; the model's one input is '{PIXELS}'")
    if datatype not in DATATYPES:
        raise InputError(f"input '{PIXELS}' has datatype {datatype!r}; send UINT8 (or another integer or FP type holding 0-255)")
    if not isinstance(shape, list | tuple) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise InputError(f"input '{PIXELS}' needs a shape: a list of non-negative integers")
    shape = list(shape)
    if shape[1:] == [*IMAGE_SHAPE, 1] or shape[1:] == [IMAGE_VALUES]:
        images = shape[0]
    elif len(shape) == 3 and shape[1:] == list(IMAGE_SHAPE):
        images = shape[0]
    else:
        raise InputError(f"input '{PIXELS}' has shape {shape}; expected [N, 28, 28] (or [N, 28, 28, 1], [N, 784])")
    if images == 0:
        raise InputError(f"input '{PIXELS}' holds no images; send at least one 28x28 image")
    if images > max_images:
        raise InputError(f"input '{PIXELS}' has {images} images; at most {max_images} per request")
    assert values is not None
    if values.size != images * IMAGE_VALUES:
        raise InputError(f"input '{PIXELS}' holds {values.size} values; its shape {shape} needs {images * IMAGE_VALUES}")
    return checked_pixels(values.reshape(images, *IMAGE_SHAPE), max_images, f"input '{PIXELS}'")


def _json_values(data: Any, datatype: str) -> np.ndarray:
    if not isinstance(data, list):
        raise InputError(f"input '{PIXELS}' needs \"data\": a list of numbers (or the binary_data_size parameter)")
    try:
        values = np.asarray(data)
    except ValueError:
        raise InputError(f"input '{PIXELS}' data is ragged; send a flat list (or evenly nested lists)") from None
    if values.size == 0:
        return values.astype(np.uint8).ravel()
    if values.dtype.kind not in "iuf" or values.dtype == bool:
        raise InputError(f"input '{PIXELS}' data must hold only numbers 0-255")
    if datatype.startswith(("UINT", "INT")) and values.dtype.kind == "f":
        raise InputError(f"input '{PIXELS}' is {datatype} but its data holds non-integer numbers")
    return values.ravel()


def _raw_values(raw: bytes, datatype: str) -> np.ndarray:
    dtype = DATATYPES[datatype][0]
    if len(raw) % dtype.itemsize:
        raise InputError(f"input '{PIXELS}' has {len(raw)} bytes of {datatype} data, not a whole number of values")
    return np.frombuffer(raw, dtype=dtype)


def _binary(parameters: Any) -> bool:
    return isinstance(parameters, dict) and parameters.get("binary_data") is True


def parse_rest_infer(body: bytes, header_length: str | None, max_images: int) -> InferRequest:
    """A REST infer body (JSON, or with ``Inference-Header-Content-Length`` a JSON header and binary tensors)."""
    binary = b""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise InputError(f"Inference-Header-Content-Length {header_length!r} does not fit a body of {len(body)} bytes")
        body, binary = body[: int(header_length)], body[int(header_length) :]
    request = parsed_json(body)
    if not isinstance(request, dict):
        raise InputError('the request must be a JSON object with "inputs"')
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InputError(f"\"inputs\" must be a list of exactly one tensor, '{PIXELS}'")
    tensor = inputs[0]
    datatype = tensor.get("datatype")
    parameters = tensor.get("parameters")
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if size is not None:
        if not isinstance(size, int) or size != len(binary):
            raise InputError(f"input '{PIXELS}' says binary_data_size {size!r}; {len(binary)} bytes follow the JSON")
        values = _raw_values(binary, datatype) if datatype in DATATYPES else None
    else:
        if binary:
            raise InputError("the body carries binary data after the JSON header, but no input has binary_data_size")
        values = _json_values(tensor.get("data"), datatype) if datatype in DATATYPES else None
    pixels = _pixels(tensor.get("name"), datatype, tensor.get("shape"), values, max_images)
    wanted, binary_outputs = _requested_outputs(request)
    request_id = request.get("id", "")
    if not isinstance(request_id, str):
        raise InputError('"id" must be a string')
    return InferRequest(pixels, request_id, wanted, binary_outputs)


def _requested_outputs(request: dict) -> tuple[list[str], set[str]]:
    all_binary = _binary_output_default(request.get("parameters"))
    outputs = request.get("outputs")
    if outputs is None:
        return list(OUTPUTS), set(OUTPUTS) if all_binary else set()
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise InputError('"outputs" must be a list of objects with a "name"')
    wanted, binary = [], set()
    for output in outputs:
        name = output.get("name")
        if name not in OUTPUTS:
            raise InputError(f"unknown output {name!r}; the model's outputs are {', '.join(OUTPUTS)}")
        wanted.append(name)
        parameters = output.get("parameters")
        if _binary(parameters) or (all_binary and not (isinstance(parameters, dict) and parameters.get("binary_data") is False)):
            binary.add(name)
    return wanted, binary


def _binary_output_default(parameters: Any) -> bool:
    return isinstance(parameters, dict) and parameters.get("binary_data_output") is True


def parse_grpc_infer(request: pb.ModelInferRequest, max_images: int) -> InferRequest:
    if len(request.inputs) != 1:
        raise InputError(f"inputs must be exactly one tensor, '{PIXELS}' (got {len(request.inputs)})")
    tensor = request.inputs[0]
    datatype = tensor.datatype
    values = None
    if datatype in DATATYPES:
        if request.raw_input_contents:
            if len(request.raw_input_contents) != 1:
                raise InputError(f"raw_input_contents has {len(request.raw_input_contents)} entries; send one, for '{PIXELS}'")
            values = _raw_values(request.raw_input_contents[0], datatype)
        else:
            contents_field = DATATYPES[datatype][1]
            if not contents_field:
                raise InputError(f"{datatype} values can only be sent in raw_input_contents")
            values = np.asarray(getattr(tensor.contents, contents_field))
    pixels = _pixels(tensor.name, datatype, list(tensor.shape), values, max_images)
    wanted = []
    for output in request.outputs:
        if output.name not in OUTPUTS:
            raise InputError(f"unknown output {output.name!r}; the model's outputs are {', '.join(OUTPUTS)}")
        wanted.append(output.name)
    return InferRequest(pixels, request.id, wanted or list(OUTPUTS))


# -- infer: answers out ------------------------------------------------------------------------------


def _output_arrays(prediction: Prediction) -> dict[str, np.ndarray]:
    return {
        SIGNATURE.probabilities: prediction.probabilities.astype("<f4", copy=False),
        SIGNATURE.digit: prediction.digits.astype("<i8", copy=False),
    }


def rest_infer_response(prediction: Prediction, request: InferRequest) -> tuple[bytes, int | None]:
    """(body, JSON header length when binary tensors follow it, else None)."""
    arrays = _output_arrays(prediction)
    outputs, chunks = [], []
    for name in request.outputs:
        array = arrays[name]
        output: dict[str, Any] = {"name": name, "datatype": OUTPUTS[name][0], "shape": list(array.shape)}
        if name in request.binary_outputs:
            chunk = array.tobytes()
            output["parameters"] = {"binary_data_size": len(chunk)}
            chunks.append(chunk)
        else:
            output["data"] = array.ravel().tolist()
        outputs.append(output)
    answer: dict[str, Any] = {"model_name": MODEL_NAME, "model_version": prediction.model.version, "outputs": outputs}
    if request.id:
        answer["id"] = request.id
    header = orjson.dumps(answer)
    return (header + b"".join(chunks), len(header)) if chunks else (header, None)


def grpc_infer_response(prediction: Prediction, request: InferRequest) -> pb.ModelInferResponse:
    """Outputs in ``raw_output_contents``, as Triton answers (and tritonclient reads)."""
    arrays = _output_arrays(prediction)
    response = pb.ModelInferResponse(model_name=MODEL_NAME, model_version=prediction.model.version, id=request.id)
    for name in request.outputs:
        array = arrays[name]
        response.outputs.add(name=name, datatype=OUTPUTS[name][0], shape=array.shape)
        response.raw_output_contents.append(array.tobytes())
    return response
