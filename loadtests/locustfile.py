"""Locust users for each way the Digits service is used. Keep this file free of the project's heavy
imports (mlflow, requests, tensorflow): Locust monkey-patches with gevent, and importing those first
ends in a RecursionError. Run it in its own process (or the compose `locust` service).

    locust -f loadtests/locustfile.py --host http://127.0.0.1:3000 SingleImageUser
    locust -f loadtests/locustfile.py --host ... --tags batch upload
    LOAD_GRPC_TARGET=127.0.0.1:8500 locust -f loadtests/locustfile.py --host ... GrpcUser

``GrpcUser`` needs ``tensorflow_serving.apis``, which imports all of TensorFlow (seconds of CPU): it is
imported once, at Locust's ``init`` and only when ``GrpcUser`` runs, never inside a running user, where
the import would hold every other user's greenlet until it finished.

Every answer is checked: status, shape, and that the predicted digit matches the label for most
requests (a ``wrong digit`` failure is counted when a whole answer disagrees with its labels more than
the tolerated share).
"""

from __future__ import annotations

import base64
import json
import os
import random
import time
from pathlib import Path

import gevent
import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import FastHttpUser, User, constant, constant_throughput, events, tag, task

grpc_gevent.init_gevent()  # gRPC's own threads must cooperate with Locust's gevent loop

DIGITS = json.loads((Path(__file__).parent / "digits.json").read_text())["digits"]
# bodies encoded once, so the generator (which shares the CPU with the server) spends no time on it
SINGLE_BODIES = [(json.dumps(d["pixels"], separators=(",", ":")), d["label"]) for d in DIGITS]
MLFLOW_SINGLE_BODIES = [
    (json.dumps({"inputs": [[[[v] for v in row] for row in d["pixels"]]]}, separators=(",", ":")), d["label"]) for d in DIGITS
]
RAW_PIXELS = [bytes(v for row in d["pixels"] for v in row) for d in DIGITS]  # 784 uint8 each
BATCH_SIZE = int(os.environ.get("LOAD_BATCH_SIZE", "256"))
RATE_PER_USER = float(os.environ.get("LOAD_RATE_PER_USER", "0"))  # >0: open loop at this many requests/s per user
MIN_CORRECT = float(os.environ.get("LOAD_MIN_CORRECT", "0.8"))  # per batch answer


def _check(response, labels: list[int], digits: list[int]) -> None:
    if len(digits) != len(labels):
        response.failure(f"expected {len(labels)} answers, got {len(digits)}")
        return
    correct = sum(digit == label for digit, label in zip(digits, labels, strict=True))
    # one image: a single wrong digit is a model error, not a service error; only batches are judged, and
    # rounding down lets a small batch hold the misreads a 98 % model makes (2 of 8 happens in ~1 % of them)
    if len(labels) > 1 and correct < int(MIN_CORRECT * len(labels)):
        response.failure(f"wrong digits: {correct}/{len(labels)} correct")


def _stagger() -> None:
    """Open loop: start each user at a random point of its period, so the users' requests arrive
    evenly spread instead of in one burst per period (constant_throughput keeps them in step)."""
    if RATE_PER_USER > 0:
        gevent.sleep(random.uniform(0, 1 / RATE_PER_USER))


class _DigitsUser(FastHttpUser):
    abstract = True
    wait_time = constant_throughput(RATE_PER_USER) if RATE_PER_USER > 0 else constant(0)

    def on_start(self) -> None:
        _stagger()

    def _post_json(self, path: str, body: object, name: str, labels: list[int], parse) -> None:
        data = body if isinstance(body, str) else json.dumps(body)
        with self.client.post(
            path, data=data, headers={"Content-Type": "application/json"}, name=name, catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            try:
                digits = parse(response.json())
            except (ValueError, KeyError, TypeError) as exc:
                response.failure(f"unexpected answer shape: {exc}")
                return
            _check(response, labels, digits)


def _predict_digits(answer: list[dict]) -> list[int]:
    for item in answer:
        if len(item["probabilities"]) != 10 or not item["model_version"]:
            raise ValueError("each answer needs 10 probabilities and a model_version")
    return [item["digit"] for item in answer]


class SingleImageUser(_DigitsUser):
    """One image per request as JSON: the adaptive-batching path."""

    @tag("single")
    @task
    def predict_one(self) -> None:
        body, label = random.choice(SINGLE_BODIES)
        self._post_json("/predict", body, "/predict [1 image]", [label], _predict_digits)


class BatchUser(_DigitsUser):
    """LOAD_BATCH_SIZE images per request as base64 raw pixels (the compact encoding)."""

    @tag("batch")
    @task
    def predict_batch(self) -> None:
        chosen = random.choices(range(len(DIGITS)), k=BATCH_SIZE)
        raw = b"".join(RAW_PIXELS[i] for i in chosen)
        self._post_json(
            "/predict",
            {"b64": base64.b64encode(raw).decode()},
            f"/predict [{BATCH_SIZE} images]",
            [DIGITS[i]["label"] for i in chosen],
            _predict_digits,
        )


class UploadUser(_DigitsUser):
    """A PNG of a digit, dark ink on light paper, as a multipart upload."""

    @tag("upload")
    @task
    def predict_image(self) -> None:
        digit = random.choice(DIGITS)
        files = {"image": ("digit.png", base64.b64decode(digit["png_b64"]), "image/png")}
        with self.client.post("/predict_image", files=files, name="/predict_image", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            answer = response.json()
            if len(answer.get("probabilities", [])) != 10:
                response.failure("answer needs 10 probabilities")


class TFServingUser(_DigitsUser):
    """TensorFlow Serving's REST row format, 8 instances per request."""

    @tag("tfserving")
    @task
    def tf_predict(self) -> None:
        chosen = random.choices(DIGITS, k=8)
        self._post_json(
            "/v1/models/mnist:predict",
            {"instances": [d["pixels"] for d in chosen]},
            "/v1/models/mnist:predict [8]",
            [d["label"] for d in chosen],
            lambda answer: [p["digit"] for p in answer["predictions"]],
        )


TF_SERVING_APIS: dict[str, object] = {}  # predict_pb2 and prediction_service_pb2_grpc, once GrpcUser is selected


@events.init.add_listener
def _import_tf_serving_apis(environment, **_kwargs) -> None:
    if any(issubclass(user, GrpcUser) for user in environment.user_classes):
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

        TF_SERVING_APIS.update(predict_pb2=predict_pb2, prediction_service_pb2_grpc=prediction_service_pb2_grpc)


class GrpcUser(User):
    """TensorFlow Serving's gRPC ``Predict``, one image per call, with the stock stubs. The target is
    ``LOAD_GRPC_TARGET`` (host:port), else the HTTP host's name with port ``GRPC_PORT`` (8500).
    Each call fires Locust's request event, so it shows in the same reports and SLO checks."""

    wait_time = constant_throughput(RATE_PER_USER) if RATE_PER_USER > 0 else constant(0)

    def on_start(self) -> None:
        predict_pb2, prediction_service_pb2_grpc = TF_SERVING_APIS["predict_pb2"], TF_SERVING_APIS["prediction_service_pb2_grpc"]
        target = (
            os.environ.get("LOAD_GRPC_TARGET")
            or f"{(self.host or 'http://127.0.0.1').split('://')[-1].split(':')[0]}:{os.environ.get('GRPC_PORT', '8500')}"
        )
        self.channel = grpc.insecure_channel(target)
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.requests = []
        for raw, digit in zip(RAW_PIXELS, DIGITS, strict=True):
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "mnist"
            tensor = request.inputs["pixels"]
            tensor.dtype = 4  # DT_UINT8
            for size in (1, 28, 28):
                tensor.tensor_shape.dim.add().size = size
            tensor.tensor_content = raw
            self.requests.append((request, digit["label"]))
        _stagger()

    def on_stop(self) -> None:
        self.channel.close()

    @tag("grpc")
    @task
    def predict(self) -> None:
        request, _label = random.choice(self.requests)
        started, length, error = time.perf_counter(), 0, None
        try:
            response = self.stub.Predict(request, timeout=30)
            length = response.ByteSize()
            digit = response.outputs["digit"]
            probabilities = response.outputs["probabilities"]  # typed fields (TF Serving's default) or packed bytes
            if (
                not (digit.int64_val or digit.tensor_content)
                or (len(probabilities.float_val) or len(probabilities.tensor_content) // 4) != 10
            ):
                error = ValueError("answer needs a digit and 10 float32 probabilities")
        except grpc.RpcError as exc:
            error = exc
        self.environment.events.request.fire(
            request_type="gRPC",
            name="Predict [1 image]",
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            exception=error,
            context={},
        )


class MlflowSingleUser(_DigitsUser):
    """MLflow's scoring server (`mlflow models serve`), one image per request, its /invocations format."""

    @tag("mlflow")
    @task
    def invocations_one(self) -> None:
        body, label = random.choice(MLFLOW_SINGLE_BODIES)
        self._post_json("/invocations", body, "/invocations [1 image]", [label], _argmax_predictions)


class MlflowBatchUser(_DigitsUser):
    """MLflow's scoring server with LOAD_BATCH_SIZE images per request."""

    @tag("mlflow")
    @task
    def invocations_batch(self) -> None:
        chosen = random.choices(DIGITS, k=BATCH_SIZE)
        body = {"inputs": [[[[v] for v in row] for row in d["pixels"]] for d in chosen]}
        self._post_json(
            "/invocations", body, f"/invocations [{BATCH_SIZE} images]", [d["label"] for d in chosen], _argmax_predictions
        )


def _argmax_predictions(answer: dict) -> list[int]:
    return [max(range(10), key=row.__getitem__) for row in answer["predictions"]]
