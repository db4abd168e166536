"""Champion and challenger on the real service: canary answers split by CANARY_PERCENT (sticky per
X-Canary-Key, over HTTP and gRPC alike), shadow copies compared in /metrics, both models in /model."""

from __future__ import annotations

import re

import grpc
import pytest
import requests
from tensorflow_serving.apis import prediction_service_pb2_grpc

from service.launcher import start_service, stop_service
from tests.helpers import REPO_ROOT, client_for
from tests.service.helpers import metric_samples, predict_request

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_versions(trained_registry, tmp_path_factory):
    """The session's store copied, with version 2 (the same model) as the challenger beside champion 1."""
    registry = trained_registry.copy(tmp_path_factory.mktemp("rollout") / "store")
    client = client_for(registry.tracking_uri)
    (first,) = client.search_model_versions("name='mnist-cnn'")
    model_id = first.source.removeprefix("models:/")
    second = client.create_model_version("mnist-cnn", first.source, run_id=first.run_id, model_id=model_id)
    client.set_registered_model_alias("mnist-cnn", "challenger", second.version)
    return registry, str(first.version), str(second.version)


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


def test_shadow_answers_from_the_champion_and_counts_the_comparisons(two_versions, sample, tmp_path):
    registry, champion, challenger = two_versions
    service = serve(registry, "shadow", tmp_path)
    try:
        images = sample["x_test"][:5].tolist()
        with requests.Session() as session:
            versions = {
                session.post(f"{service.url}/predict", json=images, timeout=10).headers["x-model-version"] for _ in range(20)
            }
        assert versions == {champion}

        def shadow_counts() -> tuple[float, float, float]:
            samples = metric_samples(service)
            compared = sum(s.value for s in samples if s.name == "digits_shadow_comparisons_total")
            agreed = sum(s.value for s in samples if s.name == "digits_shadow_agreements_total")
            dropped = sum(s.value for s in samples if s.name == "digits_shadow_dropped_total")
            return compared, agreed, dropped

        compared, agreed, dropped = shadow_counts()
        for _ in range(50):  # the copies finish off the request path
            if compared + dropped >= 100:
                break
            compared, agreed, dropped = shadow_counts()
        assert compared + dropped == 100 and compared > 0
        assert agreed == compared  # version 2 is the same model: every shadowed digit agrees
        answered = {s.labels["version"] for s in metric_samples(service) if s.name == "digits_predictions_total" and s.value > 0}
        assert answered == {champion}  # shadow copies are not answers
        exposed = {s.name for s in metric_samples(service)}
        dashboard = (REPO_ROOT / "deploy" / "grafana" / "dashboards" / "digits.json").read_text()
        plotted = set(re.findall(r"\b(digits_(?:shadow|challenger)_\w+)", dashboard))
        assert plotted and plotted <= exposed, plotted - exposed
    finally:
        stop_service(service)
