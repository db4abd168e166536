"""The real service: ``bentoml serve service:Digits`` on a loopback port, loading the champion from MLflow."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import psutil
import pytest
import requests
from PIL import Image
from tensorflow.python.saved_model import loader_impl
from tensorflow_serving.apis import prediction_service_pb2_grpc

from harness.launcher import start_service, stop_service
from tests.helpers import assert_same_answers, last_json_line, run_pipeline, seed_training, wait_until
from tests.service.helpers import (
    ADMIN_TOKEN,
    batch_histogram,
    metric_samples,
    predict_request,
    saved_model_probabilities,
    served_version,
)

pytestmark = pytest.mark.slow


def test_health_and_model_info(service, trained_registry):
    assert requests.get(f"{service.url}/livez", timeout=10).status_code == 200
    assert requests.get(f"{service.url}/readyz", timeout=10).status_code == 200
    info = requests.get(f"{service.url}/model", timeout=10).json()
    assert info["name"] == "mnist-cnn" and info["alias"] == "champion"
    assert info["run_id"] and info["loaded_at"] and 0 < info["test_accuracy"] <= 1
    spec = requests.get(f"{service.url}/docs.json", timeout=10).json()
    assert {"/predict", "/predict_image", "/model"} <= set(spec["paths"])


def test_predictions_take_the_fast_lane_unless_the_access_log_needs_bentomls_layers(service, trained_registry, sample, tmp_path):
    """By default the prediction routes are answered in front of BentoML's middlewares (each worker says
    so); with the access log on they go through them, so every prediction is in the access log."""
    assert wait_until(lambda: service.log().count("prediction routes: fast lane") >= 1, timeout=10)
    logged = start_service({**trained_registry.env, "ACCESS_LOG": "1"}, tmp_path / "service.log")
    try:
        answer = requests.post(f"{logged.url}/predict", json=sample["x_test"][0].tolist(), timeout=30)
        assert answer.status_code == 200 and answer.json()[0]["digit"] == int(sample["y_test"][0])
        assert wait_until(lambda: re.search(r"method=POST,path=/predict\b.*status=200", logged.log()), timeout=10), logged.log()[
            -2000:
        ]
        assert "prediction routes: through BentoML's middlewares (ACCESS_LOG on)" in logged.log()
        assert "prediction routes: fast lane" not in logged.log()
    finally:
        stop_service(logged)


def test_only_the_workers_load_tensorflow(service):
    """BentoML's main process imports the service to read it but never serves: without TensorFlow it
    starts the workers 5-7 s sooner. Judged by what each process has mapped, not by what it says."""

    def loads_tensorflow(process: psutil.Process) -> bool:
        return any("_pywrap_tensorflow_internal" in mapped.path for mapped in process.memory_maps())

    main = psutil.Process(service.process.pid)
    workers = main.children(recursive=True)
    assert workers and all(loads_tensorflow(worker) for worker in workers), [w.cmdline() for w in workers]
    assert not loads_tensorflow(main)


def test_predict_one_image_and_a_list_equal_the_savedmodel(service, trained_registry, sample):
    version = served_version(service)
    images = sample["x_test"][:20]
    expected = saved_model_probabilities(trained_registry, version, images)

    one = requests.post(f"{service.url}/predict", json=images[0].tolist(), timeout=30)
    assert one.status_code == 200, one.text
    assert len(one.json()) == 1 and one.json()[0]["model_version"] == version
    assert_same_answers(one.json()[0]["probabilities"], expected[0])

    many = requests.post(f"{service.url}/predict", json=images.tolist(), timeout=30).json()
    assert_same_answers([p["probabilities"] for p in many], expected)
    assert [p["digit"] for p in many] == expected.argmax(1).tolist()
    assert {p["model_version"] for p in many} == {version}


def test_tensorflow_serving_rest_formats(service, trained_registry, sample):
    version = served_version(service)
    images = sample["x_test"][:4]
    expected = saved_model_probabilities(trained_registry, version, images)
    v1 = f"{service.url}/v1/models/mnist"

    rows = requests.post(f"{v1}:predict", json={"instances": images.tolist()}, timeout=30).json()
    assert set(rows) == {"predictions"} and len(rows["predictions"]) == 4
    assert set(rows["predictions"][0]) == {"probabilities", "digit"}
    assert_same_answers([p["probabilities"] for p in rows["predictions"]], expected)

    named = requests.post(
        f"{v1}/versions/{version}:predict",
        json={"signature_name": "serving_default", "instances": [{"pixels": im.tolist()} for im in images]},
        timeout=30,
    ).json()
    assert [p["digit"] for p in named["predictions"]] == expected.argmax(1).tolist()

    columns = requests.post(f"{v1}:predict", json={"inputs": {"pixels": images.tolist()}}, timeout=30).json()
    assert set(columns) == {"outputs"} and set(columns["outputs"]) == {"probabilities", "digit"}
    assert np.asarray(columns["outputs"]["probabilities"]).shape == (4, 10)
    assert columns["outputs"]["digit"] == expected.argmax(1).tolist()

    status = requests.get(v1, timeout=10).json()
    assert status == {
        "model_version_status": [{"version": version, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]
    }
    metadata = requests.get(f"{v1}/metadata", timeout=10).json()
    assert metadata["model_spec"] == {"name": "mnist", "signature_name": "", "version": version}
    signature_defs = metadata["metadata"]["signature_def"]["signature_def"]
    saved = loader_impl.parse_saved_model(str(trained_registry.export_path)).meta_graphs[0].signature_def
    assert set(signature_defs) == set(saved) >= {"serving_default", "__saved_model_init_op"}  # all of them, as TF Serving
    assert signature_defs["__saved_model_init_op"]["inputs"] == {}  # default-valued fields printed, as TF Serving
    signature = signature_defs["serving_default"]
    assert signature["inputs"]["pixels"]["dtype"] == "DT_UINT8"
    assert [d["size"] for d in signature["inputs"]["pixels"]["tensor_shape"]["dim"]] == ["-1", "28", "28"]
    assert set(signature["outputs"]) == {"probabilities", "digit"}
    assert signature["method_name"] == "tensorflow/serving/predict"

    missing = requests.post(f"{v1}/versions/999:predict", json={"instances": images.tolist()}, timeout=10)
    assert missing.status_code == 404 and "error" in missing.json()


def test_metrics_count_answers_per_digit_and_their_confidence(service, trained_registry, sample):
    """What the drift alerts (deploy/prometheus/alerts.yml) read: per version, answers by digit and the
    sum of top probabilities."""
    version = served_version(service)

    def counted() -> tuple[dict[str, float], float]:
        samples = metric_samples(service)
        per_digit = {
            s.labels["digit"]: s.value for s in samples if s.name == "digits_predictions_total" and s.labels["version"] == version
        }
        confidence = sum(
            s.value for s in samples if s.name == "digits_prediction_confidence_sum_total" and s.labels["version"] == version
        )
        return per_digit, confidence

    images = sample["x_test"][:40]
    expected = saved_model_probabilities(trained_registry, version, images)
    before, confidence_before = counted()
    assert requests.post(f"{service.url}/predict", json=images.tolist(), timeout=30).status_code == 200
    after, confidence_after = counted()
    added = {digit: after.get(digit, 0) - before.get(digit, 0) for digit in after}
    wanted = np.bincount(expected.argmax(1), minlength=10)
    assert {d: n for d, n in added.items() if n} == {str(d): n for d, n in enumerate(wanted.tolist()) if n}
    assert confidence_after - confidence_before == pytest.approx(expected.max(1).sum(), rel=1e-3)


def test_image_upload_is_preprocessed_like_mnist_and_answered_like_its_pixels(service, sample):
    """A JPEG photo-like upload (dark ink on light paper, 6x larger) comes back as the MNIST digit it
    was made from, and is answered as /predict answers those pixels."""
    agree = 0
    for image in sample["x_test"][:20]:
        paper = Image.fromarray(255 - image).resize((168, 168), Image.Resampling.BICUBIC).convert("RGB")
        buffer = io.BytesIO()
        paper.save(buffer, "JPEG", quality=92)
        upload = requests.post(
            f"{service.url}/predict_image", files={"image": ("digit.jpg", buffer.getvalue(), "image/jpeg")}, timeout=30
        )
        assert upload.status_code == 200, upload.text
        seen = np.asarray(upload.json()["pixels"], dtype=float)
        assert np.corrcoef(seen.ravel(), image.astype(float).ravel())[0, 1] > 0.85
        same_pixels = requests.post(f"{service.url}/predict", json=seen.astype(int).tolist(), timeout=30).json()[0]
        assert upload.json()["digit"] == same_pixels["digit"]
        assert upload.json()["model_version"] == same_pixels["model_version"]
        original = requests.post(f"{service.url}/predict", json=image.tolist(), timeout=30).json()[0]
        agree += upload.json()["digit"] == original["digit"]
    assert agree >= 14  # the test model is trained for one epoch on 1,800 digits: its margins are thin


BAD_REQUESTS = [
    ("/predict", {"json": np.zeros((1, 56, 28), int).tolist()}, 400, "shape [1, 56, 28]"),
    ("/predict", {"json": [[0] * 28] * 28 + [[1] * 28]}, 400, "shape [29, 28]"),
    ("/predict", {"json": [[["x"] * 28] * 28]}, 400, "numbers"),
    ("/predict", {"json": [[999] * 28] * 28}, 400, "0-255"),
    ("/predict", {"data": "[[" + ",".join(["NaN"] * 28) + "]]", "headers": {"Content-Type": "application/json"}}, 400, ""),
    ("/predict", {"json": []}, 400, "empty"),
    ("/predict", {"json": np.zeros((301, 28, 28), int).tolist()}, 400, "at most 300"),
    (
        "/predict",
        {"data": b"[" + b"0," * 3_000_000 + b"0]", "headers": {"Content-Type": "application/json"}},
        413,
        "over the limit",
    ),
    ("/predict", {"data": "{not json", "headers": {"Content-Type": "application/json"}}, 400, "malformed JSON"),
    ("/predict", {"data": "[[0]]", "headers": {"Content-Type": "text/plain"}}, 415, "content type"),
    ("/predict_image", {"files": {"image": ("empty.png", b"", "image/png")}}, 400, "empty"),
    ("/predict_image", {"files": {"image": ("x.png", b"\x89PNG broken", "image/png")}}, 400, "cannot decode"),
    ("/predict_image", {"json": {"image": "x"}}, 415, "content type"),
    ("/v1/models/mnist:predict", {"json": {"instances": [[[0] * 28] * 27]}}, 400, "shape"),
    ("/v1/models/mnist:predict", {"json": {"instances": [], "inputs": []}}, 400, "exactly one"),
    ("/v1/models/mnist:predict", {"json": {"signature_name": "other", "instances": [[[0] * 28] * 28]}}, 400, "signature"),
    ("/v1/models/mnist:predict", {"data": "{oops", "headers": {"Content-Type": "application/json"}}, 400, "malformed JSON"),
    ("/v1/models/other:predict", {"json": {"instances": [[[0] * 28] * 28]}}, 404, "no such endpoint"),
]


@pytest.mark.parametrize(
    ("path", "kwargs", "status", "message"), BAD_REQUESTS, ids=[f"{p} {s} {m}" for p, _, s, m in BAD_REQUESTS]
)
def test_bad_input_gets_a_clear_4xx_and_the_service_keeps_serving(service, sample, path, kwargs, status, message):
    answer = requests.post(f"{service.url}{path}", timeout=30, **kwargs)
    assert answer.status_code == status, answer.text[:500]
    assert message in answer.json()["error"]
    good = requests.post(f"{service.url}/predict", json=sample["x_test"][0].tolist(), timeout=30)
    assert good.status_code == 200


def test_client_errors_are_logged_as_one_line_not_a_traceback(service):
    # client errors are logged at most 20 a worker per 10 s: the tests before may have used this window up
    deadline = time.monotonic() + 25
    while "answered 400: request body has shape [1, 2]" not in service.log() and time.monotonic() < deadline:
        answer = requests.post(f"{service.url}/predict", json=[[1, 2]], timeout=30)
        assert answer.status_code == 400
        time.sleep(1)
    log = service.log()
    assert "/predict [POST] answered 400: request body has shape [1, 2]" in log
    assert "Traceback" not in log


def test_concurrent_single_image_requests_are_batched_and_all_correct(service, trained_registry, sample):
    images = sample["x_test"][:256]
    version = served_version(service)
    expected = saved_model_probabilities(trained_registry, version, images)
    calls_before, ones_before = batch_histogram(service)
    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=64))

    def one(i: int) -> dict:
        answer = session.post(f"{service.url}/predict", json=images[i].tolist(), timeout=60)
        assert answer.status_code == 200, answer.text
        return answer.json()[0]

    with ThreadPoolExecutor(max_workers=64) as pool:
        answers = list(pool.map(one, range(len(images))))
    assert_same_answers([a["probabilities"] for a in answers], expected)
    calls_after, ones_after = batch_histogram(service)
    calls, single = calls_after - calls_before, ones_after - ones_before
    assert calls < len(images), "every request was its own model call: nothing was batched"
    assert calls - single > 0, "no model call held more than one image"


def test_hot_reload_under_http_tf_rest_and_grpc_load_fails_nothing_and_mixes_no_versions(trained_registry, sample, tmp_path):
    registry = trained_registry.copy(tmp_path / "store")  # this test trains, promotes and moves the champion back
    service = start_service({**registry.env, "MODEL_POLL_SECONDS": "1", "ADMIN_TOKEN": ADMIN_TOKEN}, tmp_path / "service.log")
    try:
        hot_reload_under_load(service, registry, sample)
    finally:
        stop_service(service)


def hot_reload_under_load(service, registry, sample) -> None:
    assert service.process.poll() is None, service.log()[-3000:]
    before = served_version(service)
    trained = run_pipeline(
        seed_training(registry.workdir / "exports", "registry.accuracy_floor=1.0"),
        registry.env,
        registry.workdir,
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    new_version = last_json_line(trained.stdout)["model_version"]
    assert new_version != before

    stop = threading.Event()
    seen: list[list[str]] = [[] for _ in range(9)]
    failures: list[str] = []
    images = sample["x_test"][:4]

    def one_request(slot: int, stub) -> set[str]:
        """One answer's versions, by HTTP JSON, TF Serving REST or gRPC (slot % 3)."""
        if slot % 3 == 2:
            response = stub.Predict(predict_request(images), timeout=30)
            return {str(response.model_spec.version.value)}
        if slot % 3 == 1:
            answer = requests.post(f"{service.url}/v1/models/mnist:predict", json={"instances": images.tolist()}, timeout=30)
            if answer.status_code != 200:
                raise AssertionError(answer.text)
            return {answer.headers["X-Model-Version"]}
        answer = requests.post(f"{service.url}/predict", json=images.tolist(), timeout=30)
        if answer.status_code != 200:
            raise AssertionError(answer.text)
        return {p["model_version"] for p in answer.json()} | {answer.headers["X-Model-Version"]}

    def hammer(slot: int) -> None:
        deadline = time.monotonic() + 120
        with grpc.insecure_channel(service.grpc_target) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    versions = one_request(slot, stub)
                except (AssertionError, grpc.RpcError, requests.RequestException) as exc:
                    failures.append(f"slot {slot}: {exc}")
                    continue
                if len(versions) != 1:
                    failures.append(f"mixed versions in one answer: {versions}")
                seen[slot].append(versions.pop())

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(len(seen))]
    for thread in threads:
        thread.start()
    try:
        time.sleep(1)
        promoted = run_pipeline(["promote", new_version], registry.env, registry.workdir)
        assert promoted.returncode == 0, promoted.stderr
        wait_until(lambda: served_version(service) == new_version, timeout=60)
        time.sleep(1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert served_version(service) == new_version
    assert not failures, failures[:3]
    for versions in seen:
        switch = versions.index(new_version) if new_version in versions else len(versions)
        assert set(versions[:switch]) <= {before} and set(versions[switch:]) <= {new_version}

    answer = requests.post(f"{service.url}/predict", json=sample["x_test"][:8].tolist(), timeout=30).json()
    expected = saved_model_probabilities(registry, new_version, sample["x_test"][:8])
    assert_same_answers([p["probabilities"] for p in answer], expected)

    # back by hand, through the guarded admin endpoint
    assert run_pipeline(["promote", before], registry.env, registry.workdir).returncode == 0
    assert requests.post(f"{service.url}/admin/reload", timeout=30).status_code == 401
    assert requests.post(f"{service.url}/admin/reload", headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401
    reloaded = requests.post(f"{service.url}/admin/reload", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=60)
    assert reloaded.status_code == 200 and reloaded.json()["version"] == before
    assert served_version(service) == before


def test_no_model_to_load_fails_with_one_clear_line(tmp_path, trained_registry):
    env = {**trained_registry.env, "MODEL_URI": "models:/no-such-model@champion"}
    running = start_service(env, tmp_path / "service.log", timeout=120)
    try:
        assert running.process.wait(timeout=120) == 3
    finally:
        stop_service(running)
    log = running.log()
    assert "cannot start, no model to serve" in log and "no-such-model" in log
    assert "Traceback" not in log


def test_admin_endpoint_is_off_without_a_token(tmp_path, trained_registry):
    env = {**trained_registry.env, "MODEL_URI": str(trained_registry.workdir / "exports" / "mnist"), "ADMIN_TOKEN": ""}
    running = start_service(env, tmp_path / "service.log")
    try:
        assert requests.post(f"{running.url}/admin/reload", headers={"Authorization": "Bearer x"}, timeout=10).status_code == 404
        info = requests.get(f"{running.url}/model", timeout=10).json()
        exports = trained_registry.workdir / "exports" / "mnist"
        assert info["version"] == str(max(int(p.name) for p in exports.iterdir() if p.name.isdigit()))  # the highest
        assert "path" not in info and str(trained_registry.workdir) not in str(info)  # no file paths revealed
    finally:
        stop_service(running)


def test_draw_page_predicts_a_drawn_digit_in_a_real_browser(service, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("no Chromium on this machine (Debian package `chromium`; .ci/run installs it)")
    page = requests.get(f"{service.url}/draw", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")

    # the page's example draws a 7 through its pointer handlers and posts the canvas PNG to /predict_image
    dom = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--user-data-dir={tmp_path}",
            "--virtual-time-budget=20000",
            "--dump-dom",
            f"{service.url}/draw#example",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    shown = re.search(r'id="result"[^>]*>Digit (\d) \(model version (\d+)\)<', dom)
    assert shown, dom[-2000:]
    assert shown.group(2) == served_version(service)
    percentages = [float(p) for p in re.findall(r"<span>([\d.]+) %</span>", dom)]
    assert len(percentages) == 10 and abs(sum(percentages) - 100) < 1
    assert max(percentages) == percentages[int(shown.group(1))]


def test_http_requests_are_counted_by_route_status_and_duration(service, sample):
    from tests.service.helpers import metric_samples

    def counted() -> dict[tuple[str, str, str], float]:
        wanted = {"bentoml_service_request_total", "bentoml_service_request_duration_seconds_count"}
        return {
            (s.name, s.labels["endpoint"], s.labels["http_response_code"]): s.value
            for s in metric_samples(service)
            if s.name in wanted and s.labels.get("endpoint") in ("/predict", "/v1/models/{model}:predict")
        }

    before = counted()
    for _ in range(7):
        assert requests.post(f"{service.url}/predict", json=sample["x_test"][0].tolist(), timeout=30).status_code == 200
    for _ in range(3):
        assert requests.post(f"{service.url}/predict", json=[[1]], timeout=30).status_code == 400
    assert requests.post(f"{service.url}/v1/models/mnist/versions/1:predict", json={}, timeout=30).status_code in (400, 404)
    after = counted()

    def grew(name: str, endpoint: str, status: str) -> float:
        return after.get((name, endpoint, status), 0.0) - before.get((name, endpoint, status), 0.0)

    for name in ("bentoml_service_request_total", "bentoml_service_request_duration_seconds_count"):
        assert grew(name, "/predict", "200") == 7 and grew(name, "/predict", "400") == 3
    tf_route = [k for k in after if k[1] == "/v1/models/{model}:predict" and after[k] > before.get(k, 0.0)]
    assert tf_route, "the TF route's versioned path is counted under its template"
    in_progress = [
        s.value
        for s in metric_samples(service)
        if s.name == "bentoml_service_request_in_progress" and s.labels.get("endpoint") == "/predict"
    ]
    assert in_progress == [0.0]
