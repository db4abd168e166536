"""The Open Inference Protocol (V2) on the real service, through Triton's and KServe's stock clients (HTTP
and gRPC) and raw HTTP.

The clients run in their own environment (``tests/service/clients/requirements.txt``: tritonclient's
protobuf bound excludes the service's), so each check is one run of a script in ``clients/`` against
the service.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.helpers import REPO_ROOT, assert_same_answers
from tests.service.helpers import saved_model_probabilities, served_version

pytestmark = pytest.mark.slow
CLIENTS = Path(__file__).parent / "clients"


@pytest.fixture(scope="module")
def clients_python() -> str:
    python = Path(os.environ.get("CLIENTS_PYTHON", REPO_ROOT / ".venv-clients" / "bin" / "python"))
    if not python.exists():
        pytest.fail(f"no clients environment at {python}: `make install-dev` creates it (or set CLIENTS_PYTHON)")
    return str(python)


@pytest.fixture(scope="module")
def triton_answers(service, sample, clients_python, tmp_path_factory) -> dict:
    images_path = tmp_path_factory.mktemp("v2") / "images.npy"
    np.save(images_path, sample["x_test"][:16])
    http_target = service.url.removeprefix("http://")
    run = subprocess.run(
        [
            clients_python,
            str(CLIENTS / "triton_v2.py"),
            http_target,
            service.grpc_target,
            str(images_path),
            served_version(service),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_triton_clients_get_the_savedmodels_answers(triton_answers, transport, service, trained_registry, sample):
    seen = triton_answers[transport]
    expected = saved_model_probabilities(trained_registry, served_version(service), sample["x_test"][:16])
    assert_same_answers(np.array(seen["binary"]["probabilities"], np.float32), expected)
    assert seen["binary"]["digit"] == expected.argmax(1).tolist()
    assert seen["float_input"] == expected.argmax(1).tolist()  # FP32 pixels holding 0-255 are accepted
    if transport == "http":
        assert seen["json"] == expected.argmax(1).tolist()  # JSON tensors as well as the binary extension
    assert seen["digit_only"], "asking for one output answers only that one"
    assert seen["request_id"] == "req-42"


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_triton_clients_see_health_and_metadata(triton_answers, transport, service):
    seen = triton_answers[transport]
    assert seen["live"] and seen["ready"] and seen["model_ready"] and seen["model_ready_served_version"]
    assert seen["metadata"] == {"name": "mnist", "versions": [served_version(service)], "inputs": ["pixels"]}
    assert seen["server"] == {"name": "digits", "extensions": ["binary_tensor_data"]}


@pytest.mark.parametrize(
    ("transport", "codes"),
    [
        ("http", {"pixel_out_of_range": "400", "unknown_model": "404", "unserved_version": "404", "wrong_shape": "400"}),
        (
            "grpc",
            {
                "pixel_out_of_range": "StatusCode.INVALID_ARGUMENT",
                "unknown_model": "StatusCode.NOT_FOUND",
                "unserved_version": "StatusCode.NOT_FOUND",
                "wrong_shape": "StatusCode.INVALID_ARGUMENT",
            },
        ),
    ],
)
def test_triton_clients_get_clear_errors(triton_answers, transport, codes):
    errors = triton_answers[transport]["errors"]
    assert {case: error["status"] for case, error in errors.items()} == codes
    assert "0-255" in errors["pixel_out_of_range"]["message"]
    assert "unknown model 'resnet'" in errors["unknown_model"]["message"]
    assert "version 999 is not served" in errors["unserved_version"]["message"]
    assert "[1, 28, 27]" in errors["wrong_shape"]["message"]


def test_kserve_clients_get_the_savedmodels_digits(service, trained_registry, sample, clients_python, tmp_path):
    images = sample["x_test"][:8]
    np.save(tmp_path / "images.npy", images)
    run = subprocess.run(
        [clients_python, str(CLIENTS / "kserve_v2.py"), service.url, service.grpc_target, str(tmp_path / "images.npy")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout)
    expected = saved_model_probabilities(trained_registry, served_version(service), images).argmax(1).tolist()
    for transport in ("rest", "grpc"):
        assert seen[transport] == {"live": True, "ready": True, "model_ready": True, "digits": expected}, transport


def test_v2_rest_by_hand_health_metadata_and_errors(service, sample):
    """What a KServe readiness probe or a hand-written client sees (no Triton client in between)."""
    url = service.url
    assert requests.get(f"{url}/v2/health/live", timeout=10).json() == {"live": True}
    assert requests.get(f"{url}/v2/health/ready", timeout=10).status_code == 200
    assert requests.get(f"{url}/v2/models/mnist/ready", timeout=10).json() == {"name": "mnist", "ready": True}
    assert requests.get(f"{url}/v2", timeout=10).json()["extensions"] == ["binary_tensor_data"]
    unknown = requests.get(f"{url}/v2/models/resnet", timeout=10)
    assert unknown.status_code == 404 and "unknown model 'resnet'" in unknown.json()["error"]
    no_verb = requests.post(f"{url}/v2/models/mnist/explain", json={}, timeout=10)
    assert no_verb.status_code == 404 and "error" in no_verb.json()
    malformed = requests.post(f"{url}/v2/models/mnist/infer", data=b"{not json", timeout=10)
    assert malformed.status_code == 400 and "malformed JSON" in malformed.json()["error"]
    # a versioned path goes through the routers rather than the hot path: same answer
    image = sample["x_test"][:1]
    body = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 28, 28], "data": image.ravel().tolist()}]}
    hot = requests.post(f"{url}/v2/models/mnist/infer", json=body, timeout=10)
    pinned = requests.post(f"{url}/v2/models/mnist/versions/{served_version(service)}/infer", json=body, timeout=10)
    assert hot.status_code == pinned.status_code == 200
    assert hot.headers["x-model-version"] == pinned.headers["x-model-version"] == served_version(service)
    assert hot.json()["outputs"][1]["data"] == pinned.json()["outputs"][1]["data"]
