"""``python -m service.client``: the same answer over HTTP and gRPC, one clean error line when it fails."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from harness.launcher import free_port
from tests.service.helpers import saved_model_probabilities, served_version

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def example_npy(sample, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("client") / "digit.npy"
    np.save(path, sample["x_test"][0])
    return str(path)


def client(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "service.client", *args], capture_output=True, text=True, timeout=120)


def test_predict_over_http_and_grpc_gives_the_savedmodels_digit(service, trained_registry, sample, tmp_path):
    images = sample["x_test"][:2]
    paths = [tmp_path / f"digit-{i}.npy" for i in range(2)]
    for path, image in zip(paths, images, strict=True):
        np.save(path, image)
    Image.fromarray(images[0]).save(tmp_path / "digit.png")
    expected = saved_model_probabilities(trained_registry, served_version(service), images).argmax(1).tolist()

    http, grpc = ["--http", service.url], ["--grpc", service.grpc_target]
    for where in (http, grpc, [*http, "--protocol", "tfserving"], [*http, "--protocol", "v2"], [*grpc, "--protocol", "v2"]):
        done = client("predict", *map(str, paths), *where)
        assert done.returncode == 0 and done.stderr == "", done.stderr
        answers = [json.loads(line) for line in done.stdout.splitlines()]
        assert [a["digit"] for a in answers] == expected
        assert all(a["model_version"] == served_version(service) for a in answers)
        picture = client("predict", str(tmp_path / "digit.png"), *where)
        assert picture.returncode == 0 and json.loads(picture.stdout)["digit"] in range(10)


def test_the_shipped_example_requests_work_as_the_readme_sends_them(service, trained_registry):
    import requests

    from tests.helpers import REPO_ROOT

    examples = REPO_ROOT / "examples"
    pixels = np.array(json.loads((examples / "digit.json").read_text()), dtype=np.uint8)
    expected = saved_model_probabilities(trained_registry, served_version(service), pixels[None]).argmax(1).tolist()
    answer = requests.post(
        f"{service.url}/predict", data=(examples / "digit.json").read_bytes(), headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == 200 and [a["digit"] for a in answer.json()] == expected
    with (examples / "digit.png").open("rb") as picture:
        upload = requests.post(f"{service.url}/predict_image", files={"image": picture})
    assert upload.status_code == 200 and upload.json()["digit"] in range(10)


@pytest.mark.parametrize("where", ["--grpc", "--http"])
def test_an_unreachable_service_is_one_error_line_without_tensorflows_start_up_noise(where):
    address = f"127.0.0.1:{free_port()}"
    done = client("metadata", where, address if where == "--grpc" else f"http://{address}")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr


def test_versions_are_pinned_and_metadata_read_in_each_protocol(service, example_npy):
    version = served_version(service)
    http, grpc = ["--http", service.url], ["--grpc", service.grpc_target]
    for where in ([*http, "--protocol", "v2"], [*grpc, "--protocol", "v2"], [*http, "--protocol", "tfserving"], grpc):
        pinned = client("predict", example_npy, *where, "--version", version)
        assert pinned.returncode == 0 and json.loads(pinned.stdout)["model_version"] == version, (where, pinned.stderr)
        other = client("predict", example_npy, *where, "--version", str(int(version) + 100))
        assert other.returncode == 1 and "is not served" in other.stderr, (where, other.stderr)
        metadata = client("metadata", *where)
        assert metadata.returncode == 0 and "pixels" in metadata.stdout, (where, metadata.stderr)
    refused = client("predict", example_npy, *http, "--version", version)
    assert refused.returncode == 1 and "--protocol tfserving or v2" in refused.stderr
    v2_status = client("status", *grpc, "--protocol", "v2")
    assert v2_status.returncode == 0 and json.loads(v2_status.stdout) == {"name": "mnist", "ready": True}
