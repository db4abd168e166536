"""TensorFlow Serving protocol conversions (REST and gRPC) in-process: requests in, answers out, typed errors."""

from __future__ import annotations

import re

import grpc
import numpy as np
import orjson
import pytest
import tensorflow as tf
from tensorflow_serving.apis import model_pb2

from service import tfserving, tfserving_grpc
from service.errors import InputError, NotFound, SignatureNotFound
from service.runtime import ModelInfo, Prediction
from tests.service.helpers import predict_request

INFO = ModelInfo("mnist-cnn", "4", "champion", None, None, "test", "test", "now")


def test_predict_request_pixels_in_every_accepted_form(sample):
    images = sample["x_test"][:3]
    for request in (
        predict_request(images),
        predict_request(images[..., None].astype(np.float32)),
        predict_request(images.astype(np.int64)),
    ):
        np.testing.assert_array_equal(tfserving_grpc.pixels_from_predict_request(request, 10), images)
    values_not_content = predict_request(images)
    tensor = values_not_content.inputs["pixels"]
    tensor.int_val.extend(images.ravel().tolist())
    tensor.tensor_content = b""
    np.testing.assert_array_equal(tfserving_grpc.pixels_from_predict_request(values_not_content, 10), images)


def test_a_tensor_whose_values_do_not_fill_its_shape_is_refused():
    request = predict_request(np.zeros((2, 28, 28), np.uint8))
    request.inputs["pixels"].tensor_content = b"\x00" * 784
    with pytest.raises(InputError, match="number of values"):
        tfserving_grpc.pixels_from_predict_request(request, 10)


def test_predict_response_round_trips_through_tensorflow():
    probabilities = np.random.default_rng(0).random((2, 10), dtype=np.float32)
    prediction = Prediction(probabilities, probabilities.argmax(1), INFO)
    response = tfserving_grpc.predict_response(prediction, predict_request(np.zeros((2, 28, 28), np.uint8)))
    np.testing.assert_array_equal(tf.make_ndarray(response.outputs["probabilities"]), probabilities)
    assert tf.make_ndarray(response.outputs["digit"]).tolist() == probabilities.argmax(1).tolist()
    assert (response.model_spec.name, response.model_spec.version.value) == ("mnist", 4)


def test_predict_response_fills_the_typed_fields_tf_serving_clients_read():
    """TF Serving's mnist_client.py and its tests read ``outputs[...].float_val`` (typed fields are its
    default); an answer only in ``tensor_content`` reads as an empty list there."""
    probabilities = np.random.default_rng(1).random((3, 10), dtype=np.float32)
    prediction = Prediction(probabilities, probabilities.argmax(1), INFO)
    response = tfserving_grpc.predict_response(prediction, predict_request(np.zeros((3, 28, 28), np.uint8)))
    np.testing.assert_array_equal(np.array(response.outputs["probabilities"].float_val, np.float32), probabilities.ravel())
    assert list(response.outputs["digit"].int64_val) == probabilities.argmax(1).tolist()
    assert not response.outputs["probabilities"].tensor_content and not response.outputs["digit"].tensor_content


@pytest.mark.parametrize(
    ("spec", "result"),
    [
        ({"name": "mnist"}, None),
        ({"name": "mnist", "signature_name": "serving_default"}, None),
        ({"name": "mnist", "version_label": "champion"}, "4"),
    ],
)
def test_model_spec_resolution(spec, result):
    assert tfserving_grpc.requested_version(model_pb2.ModelSpec(**spec), INFO) == result


def test_model_spec_pinning_a_version():
    spec = model_pb2.ModelSpec(name="mnist")
    spec.version.value = 3
    assert tfserving_grpc.requested_version(spec, INFO) == "3"


@pytest.mark.parametrize(
    ("spec", "error"), [({"name": "resnet"}, NotFound), ({"name": "mnist", "signature_name": "other"}, SignatureNotFound)]
)
def test_unknown_model_is_not_found_and_unknown_signature_a_failed_precondition(spec, error):
    with pytest.raises(error) as raised:
        tfserving_grpc.requested_version(model_pb2.ModelSpec(**spec), INFO)
    expected = grpc.StatusCode.NOT_FOUND if error is NotFound else grpc.StatusCode.FAILED_PRECONDITION
    assert raised.value.grpc_code == expected


def test_rest_row_and_columnar_formats(sample):
    images = sample["x_test"][:2]
    rows, columnar = tfserving.parse_rest_predict(orjson.dumps({"instances": images.tolist()}), 10)
    assert not columnar
    np.testing.assert_array_equal(rows, images)
    named, _ = tfserving.parse_rest_predict(orjson.dumps({"instances": [{"pixels": i.tolist()} for i in images]}), 10)
    np.testing.assert_array_equal(named, images)
    columns, columnar = tfserving.parse_rest_predict(orjson.dumps({"inputs": {"pixels": images.tolist()}}), 10)
    assert columnar
    np.testing.assert_array_equal(columns, images)


def _parsed(body: bytes):
    try:
        return tfserving.parse_rest_predict(body, 10)
    except InputError as exc:
        return f"InputError: {exc}"


@pytest.mark.parametrize(
    "instances",
    [
        b"[IMAGE]",
        b"[IMAGE, IMAGE, IMAGE]",
        b"IMAGE",  # one image, not a list of them
        b"[" + b"IMAGE," * 11 + b"IMAGE]",  # over the limit
        b"[IMAGE,]",
        b"[IMAGE] }",
        b"[]",
    ],
)
def test_plain_instances_read_from_the_bytes_give_what_the_json_path_gives(sample, instances):
    """``{"instances": [...]}`` of plain integer images skips the JSON parser; the same body with a
    (default) ``signature_name`` key cannot, so the two must agree, pixels or error."""
    body = b'{"instances": ' + instances.replace(b"IMAGE", orjson.dumps(sample["x_test"][0].tolist())) + b"}"
    general = body.replace(b'{"instances"', b'{"signature_name": "serving_default", "instances"')
    direct, expected = _parsed(body), _parsed(general)
    if isinstance(expected, str):  # the same error; where it is in the (longer) general body differs
        assert isinstance(direct, str) and re.sub(r"line \d+ column \d+ \(char \d+\)", "", direct) == re.sub(
            r"line \d+ column \d+ \(char \d+\)", "", expected
        )
    else:
        np.testing.assert_array_equal(direct[0], expected[0])
        assert direct[1] is expected[1] is False


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{oops", "malformed JSON"),
        (b"[]", "JSON object"),
        (b'{"instances": [], "inputs": []}', "exactly one"),
        (b'{"instances": []}', "non-empty"),
        (b'{"signature_name": "x", "instances": [[[0]]]}', "signature"),
        (b'{"inputs": {"image": []}}', '"pixels"'),
    ],
)
def test_rest_bad_bodies_name_the_problem(body, message):
    with pytest.raises(InputError, match=message):
        tfserving.parse_rest_predict(body, 10)


def test_model_paths():
    assert tfserving.parse_model_path("mnist:predict") == tfserving.ModelRoute("mnist", None, "predict")
    assert tfserving.parse_model_path("mnist/versions/3/metadata") == tfserving.ModelRoute("mnist", "3", "metadata")
    assert tfserving.parse_model_path("mnist") == tfserving.ModelRoute("mnist", None, None)
    assert tfserving.parse_model_path("mnist:explode") is None
    assert tfserving.parse_model_path("mnist/labels/champion:predict") == tfserving.ModelRoute(
        "mnist", None, "predict", "champion"
    )
    assert tfserving.parse_model_path("mnist/labels/champion/metadata") == tfserving.ModelRoute(
        "mnist", None, "metadata", "champion"
    )
    assert tfserving.parse_model_path("mnist/versions/3/labels/champion") is None


def test_an_unknown_version_label_is_invalid_argument_as_in_tf_serving():
    spec = model_pb2.ModelSpec(name="mnist", version_label="canary")
    with pytest.raises(InputError, match="Unrecognized servable version label: canary"):
        tfserving_grpc.requested_version(spec, INFO)
    assert tfserving.version_for_label("champion", INFO) == INFO.version
