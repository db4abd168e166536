"""A client for the Digits service over gRPC (TensorFlow Serving's API, stock stubs) or HTTP JSON.

    python -m service.client predict digit.png --grpc localhost:8500
    python -m service.client predict digit.png more.jpg --http http://localhost:3000
    python -m service.client metadata --grpc localhost:8500

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
        return [Answer(int(d), p.tolist(), version_served) for d, p in zip(digits, probabilities, strict=True)]

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


class HttpClient:
    """The service's ``POST /predict`` (JSON) and ``GET /model``."""

    def __init__(self, url: str, timeout_s: float = 30.0) -> None:
        import requests

        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.session = requests.Session()

    def predict(self, pixels: np.ndarray) -> list[Answer]:
        import base64

        raw = np.ascontiguousarray(_as_batch(pixels), dtype=np.uint8).tobytes()
        answer = self.session.post(f"{self.url}/predict", json={"b64": base64.b64encode(raw).decode()}, timeout=self.timeout_s)
        body = _json_or_error(answer)
        return [Answer(a["digit"], a["probabilities"], a["model_version"]) for a in body]

    def metadata(self) -> dict[str, Any]:
        return _json_or_error(self.session.get(f"{self.url}/v1/models/{MODEL_NAME}/metadata", timeout=self.timeout_s))

    def status(self) -> dict[str, Any]:
        return _json_or_error(self.session.get(f"{self.url}/v1/models/{MODEL_NAME}", timeout=self.timeout_s))

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
    where.add_argument("--grpc", metavar="HOST:PORT", help="TensorFlow Serving gRPC API, e.g. localhost:8500")
    where.add_argument("--http", metavar="URL", help="HTTP JSON API, e.g. http://localhost:3000")
    parser.add_argument("--version", type=int, help="answer only from this model version (gRPC)")
    args = parser.parse_args(argv)
    if args.command == "predict" and not args.files:
        parser.error("predict needs at least one file")
    try:
        client = GrpcClient(args.grpc) if args.grpc else HttpClient(args.http)
        with client:
            if args.command != "predict":
                print(json.dumps(getattr(client, args.command)(), indent=2))
                return 0
            for path in args.files:
                pixels = load_pixels(path)
                answers = client.predict(pixels, args.version) if args.version and args.grpc else client.predict(pixels)
                for answer in answers:
                    print(json.dumps({"file": str(path), **asdict(answer)}))
    except (ClientError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
