"""TensorFlow Serving's gRPC API on the real service, called with the stock stubs from tensorflow_serving.apis."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    prediction_service_pb2_grpc,
)

from harness.launcher import start_service, stop_service
from tests.helpers import assert_same_answers
from tests.service.helpers import histogram, metric_samples, predict_request, saved_model_probabilities, served_version

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def channel(service):
    with grpc.insecure_channel(service.grpc_target) as channel:
        yield channel


def test_stock_stub_gets_the_savedmodels_digits_and_probabilities(channel, service, trained_registry, sample):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    version = served_version(service)
    images = sample["x_test"][:32]
    expected = saved_model_probabilities(trained_registry, version, images)

    for request in (
        predict_request(images),  # uint8 [N, 28, 28]
        predict_request(images[..., None].astype(np.float32), signature="serving_default"),
    ):  # float [N, 28, 28, 1]
        response = stub.Predict(request, timeout=30)
        assert_same_answers(tf.make_ndarray(response.outputs["probabilities"]), expected)
        assert tf.make_ndarray(response.outputs["digit"]).tolist() == expected.argmax(1).tolist()
        assert response.model_spec.name == "mnist" and str(response.model_spec.version.value) == version
        # as TF Serving's mnist_client.py reads the answer: the typed fields
        assert_same_answers(np.array(response.outputs["probabilities"].float_val).reshape(-1, 10), expected)
        assert list(response.outputs["digit"].int64_val) == expected.argmax(1).tolist()

    pinned = stub.Predict(predict_request(images[:2], version=int(version)), timeout=30)
    assert str(pinned.model_spec.version.value) == version
    only_digits = predict_request(images[:3])
    only_digits.output_filter.append("digit")
    assert set(stub.Predict(only_digits, timeout=30).outputs) == {"digit"}


def test_metadata_shows_the_signature_and_status_the_version(channel, service):
    version = served_version(service)
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "mnist"
    metadata = prediction_service_pb2_grpc.PredictionServiceStub(channel).GetModelMetadata(request, timeout=30)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    metadata.metadata["signature_def"].Unpack(signatures)
    assert set(signatures.signature_def) >= {"serving_default", "__saved_model_init_op"}  # every one, as TF Serving
    signature = signatures.signature_def["serving_default"]
    assert signature.inputs["pixels"].dtype == tf.uint8.as_datatype_enum
    assert [d.size for d in signature.inputs["pixels"].tensor_shape.dim] == [-1, 28, 28]
    assert set(signature.outputs) == {"probabilities", "digit"}
    assert str(metadata.model_spec.version.value) == version

    status_request = get_model_status_pb2.GetModelStatusRequest()
    status_request.model_spec.name = "mnist"
    status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(status_request, timeout=30)
    assert [(str(s.version), s.state) for s in status.model_version_status] == [
        (version, get_model_status_pb2.ModelVersionStatus.AVAILABLE)
    ]


def _empty_images() -> tf.Tensor:
    return tf.make_tensor_proto(np.zeros((0, 28, 28), np.uint8))


BAD_CALLS = [
    (
        "wrong shape",
        lambda: predict_request(np.zeros((2, 27, 28), np.uint8)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "shape [2, 27, 28]",
    ),
    (
        "wrong dtype",
        lambda: predict_request(tensor=tf.make_tensor_proto([["a"] * 28] * 28)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "DT_STRING",
    ),
    ("out of range", lambda: predict_request(np.full((1, 28, 28), 300.0, np.float32)), grpc.StatusCode.INVALID_ARGUMENT, "0-255"),
    ("NaN", lambda: predict_request(np.full((1, 28, 28), np.nan, np.float32)), grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
    ("fractions", lambda: predict_request(np.full((1, 28, 28), 0.5, np.float32)), grpc.StatusCode.INVALID_ARGUMENT, "fractional"),
    ("empty", lambda: predict_request(tensor=_empty_images()), grpc.StatusCode.INVALID_ARGUMENT, "no images"),
    ("too many", lambda: predict_request(np.zeros((301, 28, 28), np.uint8)), grpc.StatusCode.INVALID_ARGUMENT, "at most 300"),
    (
        "wrong input name",
        lambda: predict_request(np.zeros((1, 28, 28), np.uint8), input_name="x"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "pixels",
    ),
    ("unknown model", lambda: predict_request(np.zeros((1, 28, 28), np.uint8), name="other"), grpc.StatusCode.NOT_FOUND, "other"),
    ("unknown version", lambda: predict_request(np.zeros((1, 28, 28), np.uint8), version=999), grpc.StatusCode.NOT_FOUND, "999"),
    (
        "unknown signature",
        lambda: predict_request(np.zeros((1, 28, 28), np.uint8), signature="classify_x"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "classify_x",
    ),
]


@pytest.mark.parametrize(("case", "build", "code", "message"), BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_calls_get_tf_serving_status_codes_and_the_service_keeps_serving(channel, sample, case, build, code, message):
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    with pytest.raises(grpc.RpcError) as failed:
        stub.Predict(build(), timeout=30)
    assert failed.value.code() == code, failed.value.details()
    assert message in failed.value.details()
    assert tf.make_ndarray(stub.Predict(predict_request(sample["x_test"][:1]), timeout=30).outputs["digit"]).shape == (1,)


def test_bytes_that_are_not_a_protobuf_get_invalid_argument_and_one_log_line(channel, service, sample):
    """TF Serving answers INVALID_ARGUMENT; gRPC's own handlers answered UNKNOWN with a traceback per call."""
    raw = channel.unary_unary("/tensorflow.serving.PredictionService/Predict")  # bytes in, bytes out
    for _ in range(30):
        with pytest.raises(grpc.RpcError) as failed:
            raw(b"\xff\xff\xff not a protobuf", timeout=10)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT, failed.value.details()
        assert "not a valid tensorflow.serving.PredictRequest" in failed.value.details()
    classify = channel.unary_unary("/tensorflow.serving.PredictionService/Classify")
    with pytest.raises(grpc.RpcError) as failed:
        classify(b"", timeout=10)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT, failed.value.details()
    assert "Expected classification signature method_name" in failed.value.details()
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    assert tf.make_ndarray(stub.Predict(predict_request(sample["x_test"][:1]), timeout=30).outputs["digit"]).shape == (1,)
    log = service.log()
    assert "Traceback" not in log
    assert log.count("answered INVALID_ARGUMENT: the request is not a valid") <= 20  # at most a burst per window


def test_health_service_and_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "tensorflow.serving.PredictionService", "tensorflow.serving.ModelService"):
        answer = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    services = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"tensorflow.serving.PredictionService", "tensorflow.serving.ModelService", "grpc.health.v1.Health"} <= services


def test_grpc_is_unavailable_until_the_model_is_loaded_then_serving(trained_registry, tmp_path):
    """Before the worker has loaded a model nothing answers (UNAVAILABLE); SERVING comes only with /readyz."""
    from harness.launcher import free_port

    grpc_port = free_port()
    env = {**trained_registry.env, "MODEL_POLL_SECONDS": "0", "GRPC_PORT": str(grpc_port)}
    seen: list[int | str] = []
    started: list = []
    launcher = threading.Thread(target=lambda: started.append(start_service(env, tmp_path / "service.log")))
    launcher.start()
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
            except grpc.RpcError as error:
                seen.append(error.code().name)
                time.sleep(0.2)
                continue
            seen.append(status)
            if status == health_pb2.HealthCheckResponse.SERVING:
                break
    launcher.join(timeout=200)
    try:
        assert started, "the service did not start"
        assert seen[0] == "UNAVAILABLE" and seen[-1] == health_pb2.HealthCheckResponse.SERVING, seen
        assert requests.get(f"{started[0].url}/readyz", timeout=10).status_code == 200
    finally:
        if started:
            stop_service(started[0])


def test_http_json_tf_rest_and_grpc_share_model_calls_and_all_answers_are_right(service, channel, trained_registry, sample):
    images = sample["x_test"][:40]  # 40 images a request: model calls long enough for other routes to queue behind
    version = served_version(service)
    expected = saved_model_probabilities(trained_registry, version, images)
    mixed_before = histogram(service, "digits_model_batch_routes")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=24))

    def one(i: int) -> list[list[float]]:
        if i % 3 == 0:
            answer = session.post(f"{service.url}/predict", json=images.tolist(), timeout=60)
            assert answer.status_code == 200, answer.text
            return [a["probabilities"] for a in answer.json()]
        if i % 3 == 1:
            answer = session.post(f"{service.url}/v1/models/mnist:predict", json={"inputs": images.tolist()}, timeout=60)
            assert answer.status_code == 200, answer.text
            return answer.json()["outputs"]["probabilities"]
        response = stub.Predict(predict_request(images), timeout=60)
        return tf.make_ndarray(response.outputs["probabilities"]).tolist()

    shared = 0.0
    for _ in range(5):  # sharing depends on timing; a few rounds make it certain on any machine
        with ThreadPoolExecutor(max_workers=24) as pool:
            answers = list(pool.map(one, range(72)))
        for answer in answers:
            assert_same_answers(answer, expected)
        mixed_after = histogram(service, "digits_model_batch_routes")
        shared = (mixed_after["count"] - mixed_after["le=1.0"]) - (mixed_before["count"] - mixed_before["le=1.0"])
        if shared > 0:
            break
    assert shared > 0, "no model call held requests from more than one route"


@pytest.mark.parametrize(
    "headers",
    [
        {},  # TF Serving's own test harness: urllib, no Content-Type
        {"Content-Type": "application/x-www-form-urlencoded"},  # api_rest.md's `curl -d '{...}'`
        {"Content-Type": "text/plain"},
    ],
    ids=["no content type", "curl -d", "text/plain"],
)
def test_tf_rest_reads_json_whatever_the_content_type_says_as_tf_serving_does(service, trained_registry, sample, headers):
    import json
    import urllib.request

    version = served_version(service)
    images = sample["x_test"][:3]
    expected = saved_model_probabilities(trained_registry, version, images)
    for path in ("/v1/models/mnist:predict", f"/v1/models/mnist/versions/{version}:predict"):
        request = urllib.request.Request(
            f"{service.url}{path}", data=json.dumps({"instances": images.tolist()}).encode(), headers=headers, method="POST"
        )
        if not headers:
            request.remove_header("Content-type")  # urllib adds a form type to POSTs unless told
            request.unredirected_hdrs.pop("Content-type", None)
        with urllib.request.urlopen(request, timeout=30) as answer:
            predictions = json.loads(answer.read())["predictions"]
        assert_same_answers(np.array([p["probabilities"] for p in predictions]), expected)


def test_version_labels_over_rest_and_grpc_name_the_served_version(service, channel, sample):
    version = served_version(service)
    alias = requests.get(f"{service.url}/model", timeout=10).json()["alias"]
    body = {"instances": sample["x_test"][:2].tolist()}
    answer = requests.post(f"{service.url}/v1/models/mnist/labels/{alias}:predict", json=body, timeout=30)
    assert answer.status_code == 200 and answer.headers["X-Model-Version"] == version
    status = requests.get(f"{service.url}/v1/models/mnist/labels/{alias}", timeout=10).json()
    assert status["model_version_status"][0]["version"] == version
    metadata = requests.get(f"{service.url}/v1/models/mnist/labels/{alias}/metadata", timeout=10).json()
    assert metadata["model_spec"]["version"] == version

    unknown = requests.post(f"{service.url}/v1/models/mnist/labels/canary:predict", json=body, timeout=30)
    assert unknown.status_code == 400 and "Unrecognized servable version label: canary" in unknown.json()["error"]
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = predict_request(sample["x_test"][:1])
    request.model_spec.version_label = "canary"
    with pytest.raises(grpc.RpcError) as failed:
        stub.Predict(request, timeout=30)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("method", "path", "message"),
    [
        ("GET", "/v1/models/mnist:predict", "Malformed request: GET /v1/models/mnist:predict"),
        ("POST", "/v1/models/mnist/metadata", "Malformed request: POST /v1/models/mnist/metadata"),
        ("POST", "/v1/models/mnist:classify", "Expected classification signature method_name"),
        ("POST", "/v1/models/mnist/versions/1:regress", "Expected regression signature method_name"),
    ],
)
def test_tf_rest_answers_what_tf_serving_answers_to_the_wrong_method_or_verb(service, sample, method, path, message):
    answer = requests.request(method, f"{service.url}{path}", json={"instances": sample["x_test"][:1].tolist()}, timeout=30)
    assert answer.status_code == 400 and message in answer.json()["error"]


def _grpc_handled(service) -> dict[tuple[str, str, str], float]:
    return {
        (s.labels["grpc_service"], s.labels["grpc_method"], s.labels["grpc_code"]): s.value
        for s in metric_samples(service)
        if s.name == "digits_grpc_server_handled_total"
    }


def test_grpc_calls_are_counted_by_method_and_status_code_in_metrics(channel, service, sample):
    """20 calls, 12 of them errors: each shows in /metrics under its service, method and status code,
    and the latency histogram counts every one."""
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    before = _grpc_handled(service)
    seconds_before = histogram(service, "digits_grpc_server_handling_seconds").get("count", 0.0)
    for _ in range(8):
        stub.Predict(predict_request(sample["x_test"][:1]), timeout=10)
    for _ in range(7):
        with pytest.raises(grpc.RpcError):
            stub.Predict(predict_request(sample["x_test"][:1], name="resnet"), timeout=10)
    for _ in range(5):
        with pytest.raises(grpc.RpcError):
            stub.Predict(predict_request(np.full((1, 28, 28), 300, np.int32)), timeout=10)
    after = _grpc_handled(service)
    predict = ("tensorflow.serving.PredictionService", "Predict")
    assert after.get((*predict, "OK"), 0) - before.get((*predict, "OK"), 0) == 8
    assert after.get((*predict, "NOT_FOUND"), 0) - before.get((*predict, "NOT_FOUND"), 0) == 7
    assert after.get((*predict, "INVALID_ARGUMENT"), 0) - before.get((*predict, "INVALID_ARGUMENT"), 0) == 5
    assert histogram(service, "digits_grpc_server_handling_seconds")["count"] - seconds_before >= 20
