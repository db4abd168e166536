"""Open Inference Protocol (V2) conversions in-process: REST JSON and binary bodies, gRPC messages, errors.

Each case follows the protocol's REST and gRPC specification (kserve.github.io, "Open Inference Protocol
(V2 Inference Protocol)") and its binary tensor data extension (Triton's ``binary_data`` extension doc).
The same behaviour through a real service and the stock clients: ``test_v2_clients.py``.
"""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from service import open_inference
from service.errors import InputError
from service.protos import open_inference_pb2 as pb
from service.runtime import ModelInfo, Prediction

INFO = ModelInfo("mnist-cnn", "4", "champion", None, None, "test", "test", "now")


def _tensor(images: np.ndarray, datatype: str = "UINT8", shape: list[int] | None = None, **extra) -> dict:
    return {"name": "pixels", "datatype": datatype, "shape": shape or list(images.shape), **extra}


def _prediction(images: int, seed: int = 0) -> Prediction:
    probabilities = np.random.default_rng(seed).random((images, 10), dtype=np.float32)
    return Prediction(probabilities, probabilities.argmax(1), INFO)


@pytest.mark.parametrize(
    ("datatype", "shape_of"),
    [
        ("UINT8", lambda n: [n, 28, 28]),
        ("FP32", lambda n: [n, 28, 28, 1]),
        ("INT64", lambda n: [n, 784]),
        ("FP64", lambda n: [n, 28, 28]),
    ],
)
def test_json_tensors_in_every_accepted_datatype_and_shape(sample, datatype, shape_of):
    images = sample["x_test"][:3]
    flat = images.ravel().astype(float if datatype.startswith("FP") else int).tolist()
    body = orjson.dumps({"inputs": [{**_tensor(images, datatype, shape_of(3)), "data": flat}]})
    request = open_inference.parse_rest_infer(body, None, 10)
    np.testing.assert_array_equal(request.pixels, images)
    assert request.outputs == ["probabilities", "digit"] and not request.binary_outputs


def test_nested_json_data_is_read_in_row_major_order(sample):
    images = sample["x_test"][:2]
    body = orjson.dumps({"inputs": [{**_tensor(images), "data": images.tolist()}]})
    np.testing.assert_array_equal(open_inference.parse_rest_infer(body, None, 10).pixels, images)


def test_binary_input_and_binary_outputs_round_trip(sample):
    images = sample["x_test"][:3]
    header = orjson.dumps(
        {
            "id": "req-1",
            "inputs": [_tensor(images, parameters={"binary_data_size": images.nbytes})],
            "outputs": [{"name": "digit", "parameters": {"binary_data": True}}, {"name": "probabilities"}],
        }
    )
    request = open_inference.parse_rest_infer(header + images.tobytes(), str(len(header)), 10)
    np.testing.assert_array_equal(request.pixels, images)
    assert (request.id, request.outputs, request.binary_outputs) == ("req-1", ["digit", "probabilities"], {"digit"})

    prediction = _prediction(3)
    body, json_length = open_inference.rest_infer_response(prediction, request)
    answer = orjson.loads(body[:json_length])
    assert answer["model_name"] == "mnist" and answer["model_version"] == "4" and answer["id"] == "req-1"
    digit, probabilities = answer["outputs"]
    assert digit == {"name": "digit", "datatype": "INT64", "shape": [3], "parameters": {"binary_data_size": 24}}
    np.testing.assert_array_equal(np.frombuffer(body[json_length:], "<i8"), prediction.digits)
    assert probabilities["datatype"] == "FP32" and probabilities["shape"] == [3, 10]
    np.testing.assert_array_equal(np.array(probabilities["data"], np.float32), prediction.probabilities.ravel())


def test_binary_data_output_parameter_makes_every_output_binary(sample):
    images = sample["x_test"][:1]
    body = orjson.dumps(
        {"parameters": {"binary_data_output": True}, "inputs": [{**_tensor(images), "data": images.ravel().tolist()}]}
    )
    request = open_inference.parse_rest_infer(body, None, 10)
    assert request.binary_outputs == {"probabilities", "digit"}
    payload, json_length = open_inference.rest_infer_response(_prediction(1), request)
    assert json_length is not None and len(payload) == json_length + 40 + 8


def test_a_json_answer_without_binary_outputs_has_no_header_length():
    request = open_inference.InferRequest(np.zeros((2, 28, 28), np.uint8))
    payload, json_length = open_inference.rest_infer_response(_prediction(2), request)
    assert json_length is None
    outputs = {o["name"]: o for o in orjson.loads(payload)["outputs"]}
    assert outputs["digit"]["shape"] == [2] and len(outputs["probabilities"]["data"]) == 20


@pytest.mark.parametrize(
    ("request_json", "message"),
    [
        ([], "JSON object"),
        ({"inputs": []}, "exactly one tensor"),
        ({"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 28, 28], "data": [0] * 784}]}, "unknown input 'image'"),
        ({"inputs": [{"name": "pixels", "datatype": "BYTES", "shape": [1], "data": ["x"]}]}, "datatype 'BYTES'"),
        ({"inputs": [{"name": "pixels", "datatype": "UINT8", "data": [0] * 784}]}, "needs a shape"),
        ({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 27, 29], "data": [0] * 783}]}, "shape [1, 27, 29]"),
        ({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 28, 28], "data": [0] * 783}]}, "holds 783 values"),
        ({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [0, 28, 28], "data": []}]}, "no images"),
        ({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [11, 28, 28], "data": [0] * 784 * 11}]}, "at most 10"),
        ({"inputs": [{"name": "pixels", "datatype": "INT32", "shape": [1, 28, 28], "data": [256] * 784}]}, "0-255"),
        ({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 28, 28], "data": [0.5] * 784}]}, "non-integer"),
        ({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 28, 28], "data": [0.5] * 784}]}, "fractional"),
        ({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 28, 28], "data": "zeros"}]}, '"data"'),
        (
            {
                "inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 28, 28], "data": [0] * 784}],
                "outputs": [{"name": "logits"}],
            },
            "unknown output 'logits'",
        ),
        (
            {"id": 7, "inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 28, 28], "data": [0] * 784}]},
            '"id" must be a string',
        ),
    ],
)
def test_bad_json_requests_are_input_errors_naming_the_problem(request_json, message):
    with pytest.raises(InputError) as raised:
        open_inference.parse_rest_infer(orjson.dumps(request_json), None, 10)
    assert message in str(raised.value)


def test_bad_binary_requests_are_input_errors():
    header = orjson.dumps({"inputs": [_tensor(np.zeros((1, 28, 28)), parameters={"binary_data_size": 784})]})
    with pytest.raises(InputError, match="binary_data_size 784; 700 bytes"):
        open_inference.parse_rest_infer(header + b"\0" * 700, str(len(header)), 10)
    with pytest.raises(InputError, match="does not fit"):
        open_inference.parse_rest_infer(header, str(len(header) + 1), 10)
    plain = orjson.dumps({"inputs": [{**_tensor(np.zeros((1, 28, 28))), "data": [0] * 784}]})
    with pytest.raises(InputError, match="no input has binary_data_size"):
        open_inference.parse_rest_infer(plain + b"\0" * 4, str(len(plain)), 10)
    odd = orjson.dumps({"inputs": [_tensor(np.zeros((1, 28, 28)), "FP32", parameters={"binary_data_size": 3})]})
    with pytest.raises(InputError, match="whole number"):
        open_inference.parse_rest_infer(odd + b"\0" * 3, str(len(odd)), 10)


def test_grpc_raw_and_typed_contents(sample):
    images = sample["x_test"][:3]
    raw = pb.ModelInferRequest(model_name="mnist", id="g1", inputs=[_tensor(images)], raw_input_contents=[images.tobytes()])
    parsed = open_inference.parse_grpc_infer(raw, 10)
    np.testing.assert_array_equal(parsed.pixels, images)
    assert parsed.id == "g1" and parsed.outputs == ["probabilities", "digit"]
    typed = pb.ModelInferRequest(model_name="mnist", inputs=[_tensor(images, "FP32")], outputs=[{"name": "digit"}])
    typed.inputs[0].contents.fp32_contents.extend(images.ravel().astype(float).tolist())
    parsed = open_inference.parse_grpc_infer(typed, 10)
    np.testing.assert_array_equal(parsed.pixels, images)
    assert parsed.outputs == ["digit"]

    prediction = _prediction(3)
    response = open_inference.grpc_infer_response(prediction, parsed)
    assert (response.model_name, response.model_version, [o.name for o in response.outputs]) == ("mnist", "4", ["digit"])
    assert list(response.outputs[0].shape) == [3] and response.outputs[0].datatype == "INT64"
    np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], "<i8"), prediction.digits)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.inputs.add(name="extra"), "exactly one tensor"),
        (lambda r: r.raw_input_contents.append(b"\0"), "2 entries"),
        (lambda r: setattr(r.inputs[0], "datatype", "FP16") or r.ClearField("raw_input_contents"), "only be sent in raw"),
        (lambda r: r.outputs.add(name="logits"), "unknown output 'logits'"),
        (lambda r: r.inputs[0].ClearField("shape") or r.inputs[0].shape.extend([2, 28, 28]), "holds 784 values"),
    ],
)
def test_bad_grpc_requests_are_input_errors(change, message):
    request = pb.ModelInferRequest(model_name="mnist", inputs=[_tensor(np.zeros((1, 28, 28)))], raw_input_contents=[bytes(784)])
    change(request)
    with pytest.raises(InputError, match=message):
        open_inference.parse_grpc_infer(request, 10)


def test_metadata_describes_the_signature_and_paths_parse():
    metadata = open_inference.model_metadata("4")
    assert metadata["name"] == "mnist" and metadata["versions"] == ["4"]
    assert metadata["inputs"] == [{"name": "pixels", "datatype": "UINT8", "shape": [-1, 28, 28]}]
    assert {o["name"]: (o["datatype"], o["shape"]) for o in metadata["outputs"]} == {
        "probabilities": ("FP32", [-1, 10]),
        "digit": ("INT64", [-1]),
    }
    assert open_inference.grpc_model_metadata("4").inputs[0].shape == [-1, 28, 28]
    assert open_inference.parse_model_path("mnist/versions/3/infer") == open_inference.ModelRoute("mnist", "3", "infer")
    assert open_inference.parse_model_path("mnist/ready") == open_inference.ModelRoute("mnist", None, "ready")
    assert open_inference.parse_model_path("mnist") == open_inference.ModelRoute("mnist", None, None)
    assert open_inference.parse_model_path("mnist/versions/3/explain") is None
