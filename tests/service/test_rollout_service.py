"""Champion and challenger on the real service: canary answers split by CANARY_PERCENT (sticky per
X-Canary-Key, over HTTP and gRPC alike), shadow copies compared in /metrics, both models in /model, and
hot reload of both aliases during canary traffic."""

from __future__ import annotations

import re
import threading
import time

import grpc
import pytest
import requests
from tensorflow_serving.apis import prediction_service_pb2_grpc

from harness.launcher import start_service, stop_service
from tests.helpers import REPO_ROOT, assert_same_answers, client_for, run_pipeline, seed_training, wait_until
from tests.service.helpers import metric_samples, predict_request, saved_model_probabilities

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_versions(trained_registry, tmp_path_factory):
    """The session's store copied, with a second, differently seeded model trained into it: registered as
    the challenger (version 2), kept from champion by a gate it cannot pass."""
    registry = trained_registry.copy(tmp_path_factory.mktemp("rollout") / "store")
    trained = run_pipeline(
        seed_training(registry.workdir / "exports", "seed=7", "registry.accuracy_floor=0.999"), registry.env, registry.workdir
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    client = client_for(registry.tracking_uri)
    champion = client.get_model_version_by_alias("mnist-cnn", "champion").version
    challenger = client.get_model_version_by_alias("mnist-cnn", "challenger").version
    assert (str(champion), str(challenger)) == ("1", "2")
    return registry, "1", "2"


def serve(registry, mode: str, tmp_path, **extra: str):
    env = {**registry.env, "MODEL_URI": "models:/mnist-cnn@champion", "CHALLENGER_MODE": mode, **extra}
    running = start_service(env, tmp_path / f"{mode}.log")
    assert running.process.poll() is None, running.log()[-3000:]
    return running


def test_canary_splits_answers_sticks_per_key_and_says_which_version_answered(two_versions, sample, tmp_path):
    registry, champion, challenger = two_versions
    service = serve(registry, "canary", tmp_path, CANARY_PERCENT="50")
    try:
        image = sample["x_test"][:1].tolist()
        with requests.Session() as session:
            answers = [session.post(f"{service.url}/predict", json=image, timeout=10) for _ in range(200)]
            versions = [a.headers["x-model-version"] for a in answers]
            assert all(a.json()[0]["model_version"] == v for a, v in zip(answers, versions, strict=True))
            assert set(versions) == {champion, challenger}
            assert 0.35 < versions.count(challenger) / len(versions) < 0.65  # 50 %: 4.2 sigma either side
            sticky = {
                session.post(f"{service.url}/predict", json=image, headers={"X-Canary-Key": "user-7"}, timeout=10).headers[
                    "x-model-version"
                ]
                for _ in range(30)
            }
            assert len(sticky) == 1
            info = session.get(f"{service.url}/model", timeout=10).json()
        assert info["version"] == champion
        assert info["challenger"]["version"] == challenger and info["challenger"]["mode"] == "canary"
        with grpc.insecure_channel(service.grpc_target) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            over_grpc = {
                str(
                    stub.Predict(
                        predict_request(sample["x_test"][:1]), timeout=10, metadata=(("x-canary-key", "user-7"),)
                    ).model_spec.version.value
                )
                for _ in range(10)
            }
        assert over_grpc == sticky  # the same key picks the same model whatever the protocol
        samples = metric_samples(service)
        assert any(s.name == "digits_challenger_info" and s.labels["version"] == challenger and s.value == 1 for s in samples)
        answered = {s.labels["version"] for s in samples if s.name == "digits_predictions_total" and s.value > 0}
        assert answered == {champion, challenger}
    finally:
        stop_service(service)


def test_shadow_answers_from_the_champion_and_its_agreement_is_the_two_models(two_versions, sample, tmp_path):
    registry, champion, challenger = two_versions
    service = serve(registry, "shadow", tmp_path)
    try:
        images = sample["x_test"][:100]
        with requests.Session() as session:
            # one request of 100 images: one champion call and one shadow call of exactly these 100
            answer = session.post(f"{service.url}/predict", json=images.tolist(), timeout=30)
            answers = [session.post(f"{service.url}/predict", json=images[:5].tolist(), timeout=10) for _ in range(10)]
        assert {a.headers["x-model-version"] for a in [answer, *answers]} == {champion}

        def shadow_counts() -> tuple[float, float, float]:
            samples = metric_samples(service)
            compared = sum(s.value for s in samples if s.name == "digits_shadow_comparisons_total")
            agreed = sum(s.value for s in samples if s.name == "digits_shadow_agreements_total")
            dropped = sum(s.value for s in samples if s.name == "digits_shadow_dropped_total")
            return compared, agreed, dropped

        compared, agreed, dropped = shadow_counts()
        for _ in range(50):  # the copies finish off the request path
            if compared + dropped >= 150:
                break
            compared, agreed, dropped = shadow_counts()
        assert (compared, dropped) == (150, 0)  # idle between requests: every copy was compared
        first = saved_model_probabilities(registry, champion, images).argmax(1)
        second = saved_model_probabilities(registry, challenger, images).argmax(1)
        five = (first[:5] == second[:5]).sum()
        assert agreed == (first == second).sum() + 10 * five  # what the two models say on the same inputs
        assert 0 < agreed < 150 or (first == second).all()
        answered = {s.labels["version"] for s in metric_samples(service) if s.name == "digits_predictions_total" and s.value > 0}
        assert answered == {champion}  # shadow copies are not answers
        exposed = {s.name for s in metric_samples(service)}
        dashboard = (REPO_ROOT / "deploy" / "grafana" / "dashboards" / "digits.json").read_text()
        plotted = set(re.findall(r"\b(digits_(?:shadow|challenger)_\w+)", dashboard))
        assert plotted and plotted <= exposed, plotted - exposed
    finally:
        stop_service(service)


def test_swapping_both_aliases_under_canary_load_fails_nothing_and_every_answer_is_one_version(two_versions, sample, tmp_path):
    shared, champion, challenger = two_versions
    registry = shared.copy(tmp_path / "store")  # this test moves both aliases
    service = serve(registry, "canary", tmp_path, CANARY_PERCENT="50", MODEL_POLL_SECONDS="1")
    images = sample["x_test"][:5]
    expected = {version: saved_model_probabilities(registry, version, images) for version in (champion, challenger)}
    answers: list[tuple[str, list[dict]]] = []
    failures: list[str] = []
    stop = threading.Event()

    def hammer() -> None:
        deadline = time.monotonic() + 90
        with requests.Session() as session:
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    answer = session.post(f"{service.url}/predict", json=images.tolist(), timeout=30)
                except requests.RequestException as exc:
                    failures.append(str(exc))
                    continue
                if answer.status_code != 200:
                    failures.append(f"{answer.status_code}: {answer.text[:200]}")
                    continue
                answers.append((answer.headers["x-model-version"], answer.json()))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(1)
        client = client_for(registry.tracking_uri)
        client.set_registered_model_alias("mnist-cnn", "champion", challenger)  # the challenger wins ...
        client.set_registered_model_alias("mnist-cnn", "challenger", champion)  # ... and the old champion waits

        def swapped() -> dict | None:
            info = requests.get(f"{service.url}/model", timeout=10).json()
            return info if info["version"] == challenger and info["challenger"]["version"] == champion else None

        info = wait_until(swapped, timeout=60) or requests.get(f"{service.url}/model", timeout=10).json()
        time.sleep(1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        stop_service(service)
    assert info["version"] == challenger and info["challenger"]["version"] == champion, info
    assert not failures, failures[:3]
    assert len(answers) > 20 and {version for version, _ in answers} == {champion, challenger}
    for version, body in answers:
        assert {image["model_version"] for image in body} == {version}  # one version per answer, as it says
        assert_same_answers([image["probabilities"] for image in body], expected[version])  # and it is that model
