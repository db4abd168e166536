"""A client for the Digits service over HTTP or gRPC, in the service's own protocol, TensorFlow Serving's or V2's.

    python -m service.client predict digit.png --grpc localhost:8500
    python -m service.client predict digit.png more.jpg --http http://localhost:3000
    python -m service.client predict digit.png --http http://localhost:3000 --protocol v2 --version 3
    python -m service.client metadata --grpc localhost:8500 --protocol v2

Protocols: ``tfserving`` (TensorFlow Serving's REST and gRPC APIs; the default over gRPC), ``v2`` (the
Open Inference Protocol of KServe and Triton), ``digits`` (the service's ``POST /predict``; the default
over HTTP).

As a library::

    from service.client import GrpcClient
    with GrpcClient("localhost:8500") as client:
        answers = client.predict(pixels)          # uint8 [N, 28, 28] -> list[Answer]

Pictures are turned into MNIST-like 28x28 pixels here, the way the service's ``/predict_image`` does,
so both protocols send the same pixels. ``.npy`` files holding ``[28, 28]`` or ``[N, 28, 28]`` are sent as is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from contract import SERVABLE_NAME as MODEL_NAME
from contract import SIGNATURE

INPUT_NAME = SIGNATURE.input


@dataclass(frozen=True)
class Answer:
    digit: int
    probabilities: list[float]
    model_version: str


class ClientError(RuntimeError):
    """The service refused or failed a request; the message is the service's."""


class GrpcClient:
    """TensorFlow Serving's ``PredictionService`` and ``ModelService`` for the ``mnist`` model."""

    def __init__(self, target: str, timeout_s: float = 30.0) -> None:
        import grpc

        from quiet import native_stderr_to_devnull

        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
        with native_stderr_to_devnull():  # TF Serving's protos import TensorFlow, whose native start-up is noisy
            from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

        self._grpc = grpc
        self.timeout_s = timeout_s
        self.channel = grpc.insecure_channel(target)
        self.predictions = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)

    def predict(self, pixels: np.ndarray, version: int | None = None) -> list[Answer]:
        from tensorflow_serving.apis import predict_pb2

        pixels = np.ascontiguousarray(_as_batch(pixels), dtype=np.uint8)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = MODEL_NAME
        request.model_spec.signature_name = SIGNATURE.name
        if version is not None:
            request.model_spec.version.value = version
        tensor = request.inputs[INPUT_NAME]
        tensor.dtype = 4  # DT_UINT8
        for size in pixels.shape:
            tensor.tensor_shape.dim.add().size = size
        tensor.tensor_content = pixels.tobytes()
        response = self._call(self.predictions.Predict, request)
        probabilities = _array(response.outputs[SIGNATURE.probabilities], np.float32)
        digits = _array(response.outputs[SIGNATURE.digit], np.int64)
        version_served = str(response.model_spec.version.value)
        return _answers(digits, probabilities, version_served)

    def metadata(self) -> dict[str, Any]:
        from google.protobuf.json_format import MessageToDict
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        request.model_spec.name = MODEL_NAME
        response = self._call(self.predictions.GetModelMetadata, request)
        signatures = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signatures)
        return {
            "model_spec": MessageToDict(response.model_spec),
            "signature_def": MessageToDict(signatures, preserving_proto_field_name=True),
        }

    def status(self) -> dict[str, Any]:
        from google.protobuf.json_format import MessageToDict
        from tensorflow_serving.apis import get_model_status_pb2

        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = MODEL_NAME
        return MessageToDict(self._call(self.models.GetModelStatus, request))

    def _call(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout_s)
        except self._grpc.RpcError as error:
            raise ClientError(f"{error.code().name}: {error.details()}") from None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> GrpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class V2GrpcClient:
    """The Open Inference Protocol's ``inference.GRPCInferenceService`` (no TensorFlow needed)."""

    SERVICE = "/inference.GRPCInferenceService/"

    def __init__(self, target: str, timeout_s: float = 30.0) -> None:
        import grpc

        from service.protos import open_inference_pb2 as v2

        self._grpc, self.v2, self.timeout_s = grpc, v2, timeout_s
        self.channel = grpc.insecure_channel(target)

    def _call(self, method: str, request: Any, response_class: Any) -> Any:
        serialize, deserialize = type(request).SerializeToString, response_class.FromString
        call = self.channel.unary_unary(self.SERVICE + method, request_serializer=serialize, response_deserializer=deserialize)
        try:
            return call(request, timeout=self.timeout_s)
        except self._grpc.RpcError as error:
            raise ClientError(f"{error.code().name}: {error.details()}") from None

    def predict(self, pixels: np.ndarray, version: int | None = None) -> list[Answer]:
        pixels = np.ascontiguousarray(_as_batch(pixels), dtype=np.uint8)
        request = self.v2.ModelInferRequest(model_name=MODEL_NAME, model_version=str(version or ""))
        request.inputs.add(name=INPUT_NAME, datatype="UINT8", shape=pixels.shape)
        request.raw_input_contents.append(pixels.tobytes())
        response = self._call("ModelInfer", request, self.v2.ModelInferResponse)
        arrays = {
            output.name: np.frombuffer(raw, "<f4" if output.datatype == "FP32" else "<i8").reshape(output.shape)
            for output, raw in zip(response.outputs, response.raw_output_contents, strict=True)
        }
        return _answers(arrays[SIGNATURE.digit], arrays[SIGNATURE.probabilities], response.model_version)

    def metadata(self) -> dict[str, Any]:
        from google.protobuf.json_format import MessageToDict

        request = self.v2.ModelMetadataRequest(name=MODEL_NAME)
        return MessageToDict(self._call("ModelMetadata", request, self.v2.ModelMetadataResponse))

    def status(self) -> dict[str, Any]:
        ready = self._call("ModelReady", self.v2.ModelReadyRequest(name=MODEL_NAME), self.v2.ModelReadyResponse)
        return {"name": MODEL_NAME, "ready": ready.ready}

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> V2GrpcClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HttpClient:
    """Over HTTP: ``protocol`` ``digits`` (``POST /predict``), ``tfserving`` (``/v1/models/mnist``) or ``v2``
    (``/v2/models/mnist``, binary tensors). Metadata and status come from TF Serving's routes unless ``v2``."""

    def __init__(self, url: str, timeout_s: float = 30.0, protocol: str = "digits") -> None:
        import requests

        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.protocol = protocol
        self.session = requests.Session()

    def _model_url(self, version: int | None) -> str:
        base = f"{self.url}/{'v2' if self.protocol == 'v2' else 'v1'}/models/{MODEL_NAME}"
        return f"{base}/versions/{version}" if version is not None else base

    def predict(self, pixels: np.ndarray, version: int | None = None) -> list[Answer]:
        pixels = np.ascontiguousarray(_as_batch(pixels), dtype=np.uint8)
        if self.protocol == "v2":
            return self._predict_v2(pixels, version)
        if self.protocol == "tfserving":
            answer = self.session.post(
                f"{self._model_url(version)}:predict", json={"instances": pixels.tolist()}, timeout=self.timeout_s
            )
            body = _json_or_error(answer)
            predictions = body["predictions"]
            return [
                Answer(p[SIGNATURE.digit], p[SIGNATURE.probabilities], answer.headers.get("x-model-version", ""))
                for p in predictions
            ]
        if version is not None:
            raise ClientError("POST /predict serves the current version only; pin one with --protocol tfserving or v2")
        import base64

        raw = base64.b64encode(pixels.tobytes()).decode()
        body = _json_or_error(self.session.post(f"{self.url}/predict", json={"b64": raw}, timeout=self.timeout_s))
        return [Answer(a["digit"], a["probabilities"], a["model_version"]) for a in body]

    def _predict_v2(self, pixels: np.ndarray, version: int | None) -> list[Answer]:
        tensor = {"name": INPUT_NAME, "datatype": "UINT8", "shape": list(pixels.shape)}
        tensor["parameters"] = {"binary_data_size": pixels.nbytes}
        header = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}}).encode()
        answer = self.session.post(
            f"{self._model_url(version)}/infer",
            data=header + pixels.tobytes(),
            headers={"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
            timeout=self.timeout_s,
        )
        if answer.status_code != 200:
            _json_or_error(answer)
        length = int(answer.headers.get("inference-header-content-length", len(answer.content)))
        body, arrays, offset = json.loads(answer.content[:length]), {}, length
        for output in body["outputs"]:
            size = output["parameters"]["binary_data_size"]
            dtype = "<f4" if output["datatype"] == "FP32" else "<i8"
            arrays[output["name"]] = np.frombuffer(answer.content[offset : offset + size], dtype).reshape(output["shape"])
            offset += size
        return _answers(arrays[SIGNATURE.digit], arrays[SIGNATURE.probabilities], body["model_version"])

    def metadata(self) -> dict[str, Any]:
        path = "" if self.protocol == "v2" else "/metadata"
        return _json_or_error(self.session.get(f"{self._model_url(None)}{path}", timeout=self.timeout_s))

    def status(self) -> dict[str, Any]:
        path = "/ready" if self.protocol == "v2" else ""
        return _json_or_error(self.session.get(f"{self._model_url(None)}{path}", timeout=self.timeout_s))

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _json_or_error(answer: Any) -> Any:
    try:
        body = answer.json()
    except ValueError:
        body = None
    if answer.status_code != 200:
        message = body.get("error") if isinstance(body, dict) else answer.text[:200]
        raise ClientError(f"HTTP {answer.status_code}: {message}")
    return body


def _answers(digits: np.ndarray, probabilities: np.ndarray, version: str) -> list[Answer]:
    return [Answer(int(d), p.tolist(), version) for d, p in zip(digits, probabilities, strict=True)]


def _as_batch(pixels: np.ndarray) -> np.ndarray:
    pixels = np.asarray(pixels)
    return pixels[None] if pixels.ndim == 2 else pixels


def _array(tensor: Any, dtype: type) -> np.ndarray:
    shape = [d.size for d in tensor.tensor_shape.dim]
    if tensor.tensor_content:
        return np.frombuffer(tensor.tensor_content, dtype=dtype).reshape(shape)
    values = tensor.float_val if dtype == np.float32 else tensor.int64_val
    return np.asarray(values, dtype=dtype).reshape(shape)


def load_pixels(path: Path) -> np.ndarray:
    """A picture (PNG, JPEG, ...) as MNIST-like uint8 ``[1, 28, 28]``, or a ``.npy`` of pixels as is."""
    from service.inputs import pixels_from_image_bytes

    if path.suffix == ".npy":
        return _as_batch(np.load(path))
    return pixels_from_image_bytes(path.read_bytes())[None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.client", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["predict", "metadata", "status"])
    parser.add_argument("files", nargs="*", type=Path, help="pictures of digits, or .npy pixel arrays (predict)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--grpc", metavar="HOST:PORT", help="the gRPC port, e.g. localhost:8500")
    where.add_argument("--http", metavar="URL", help="the HTTP port, e.g. http://localhost:3000")
    parser.add_argument(
        "--protocol",
        choices=["digits", "tfserving", "v2"],
        help="digits: POST /predict (HTTP only; the HTTP default); tfserving: TensorFlow Serving's API (the gRPC default); "
        "v2: the Open Inference Protocol (KServe, Triton)",
    )
    parser.add_argument("--version", type=int, help="answer only from this model version (tfserving or v2)")
    args = parser.parse_args(argv)
    if args.command == "predict" and not args.files:
        parser.error("predict needs at least one file")
    protocol = args.protocol or ("tfserving" if args.grpc else "digits")
    if args.grpc and protocol == "digits":
        parser.error("--protocol digits is HTTP only; over gRPC use tfserving or v2")
    try:
        if args.grpc:
            client = V2GrpcClient(args.grpc) if protocol == "v2" else GrpcClient(args.grpc)
        else:
            client = HttpClient(args.http, protocol=protocol)
        with client:
            if args.command != "predict":
                print(json.dumps(getattr(client, args.command)(), indent=2))
                return 0
            for path in args.files:
                answers = client.predict(load_pixels(path), args.version)
                for answer in answers:
                    print(json.dumps({"file": str(path), **asdict(answer)}))
    except (ClientError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
