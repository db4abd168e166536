"""Two ``bentoml serve`` replicas behind a real nginx (the compose stack's site config, Debian's nginx),
all on free loopback ports: both answer, both follow a promotion, and a replica restart fails nothing."""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from collections import Counter

import grpc
import pytest
import requests
import tensorflow as tf
import yaml
from tensorflow_serving.apis import prediction_service_pb2_grpc

from contract import CHAMPION, REGISTERED_MODEL
from harness.launcher import REPO_ROOT, nginx_binary, start_nginx, start_service, stop_process
from tests.helpers import client_for
from tests.service.helpers import ADMIN_TOKEN, metric_samples, predict_request, served_version

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(nginx_binary() is None, reason="needs nginx (.ci/run installs it)"),
]

POLL_SECONDS = 1


def predictions_counted(replica) -> float:
    """Requests to ``/predict`` this replica has answered, from its own ``/metrics``."""
    return sum(
        sample.value
        for sample in metric_samples(replica)
        if sample.name == "bentoml_service_request_total" and sample.labels.get("endpoint") == "/predict"
    )


def model_info(replica) -> dict[str, float]:
    return {sample.labels["version"]: sample.value for sample in metric_samples(replica) if sample.name == "digits_model_info"}


@pytest.fixture(scope="module")
def cluster(trained_registry, tmp_path_factory):
    """A private registry, two single-worker replicas that poll it every second, nginx in front; shared
    by this module's tests, in order (the restart test leaves a new replica in place of the first)."""
    tmp_path = tmp_path_factory.mktemp("cluster")
    registry = trained_registry.copy(tmp_path / "store")
    env = {
        **registry.env,
        "MODEL_POLL_SECONDS": str(POLL_SECONDS),
        "SERVICE_WORKERS": "1",
        "ADMIN_TOKEN": ADMIN_TOKEN,
        "TRUSTED_PROXIES": "127.0.0.1",  # nginx reaches the replicas from 127.0.0.1; clients come from 127.0.0.2+
    }
    replicas = [start_service(env, tmp_path / f"replica-{n}" / "service.log") for n in (0, 1)]
    balancer = None
    try:
        for replica in replicas:
            assert replica.process.poll() is None, replica.log()[-3000:]
        addresses = [replica.url.removeprefix("http://") for replica in replicas]
        balancer = start_nginx(addresses, [replica.grpc_target for replica in replicas], tmp_path / "nginx")
        assert balancer.process.poll() is None, balancer.log()[-3000:]
        yield registry, env, replicas, balancer
    finally:
        for running in [*replicas, *([balancer] if balancer else [])]:
            stop_process(running)


def hammer(
    url: str, images: list, stop: threading.Event, seconds: float, threads: int = 6, max_requests: int = 5000
) -> tuple[Counter, list[str]]:
    """``threads`` clients POSTing to ``url/predict`` until ``stop`` is set (at most ``seconds`` and
    ``max_requests`` in all): the answering replica (nginx's ``X-Upstream``) per request, and every failure."""
    answered: Counter = Counter()
    failures: list[str] = []
    deadline = time.monotonic() + seconds
    lock = threading.Lock()

    def client() -> None:
        with requests.Session() as session:
            while time.monotonic() < deadline and not stop.is_set():
                with lock:
                    if sum(answered.values()) + len(failures) >= max_requests:
                        return
                try:
                    answer = session.post(f"{url}/predict", json=images, timeout=30)
                    ok = answer.status_code == 200
                    outcome = answer.headers.get("X-Upstream") if ok else f"{answer.status_code} {answer.text[:200]}"
                except requests.RequestException as exc:
                    outcome, ok = f"{type(exc).__name__}: {exc}", False
                with lock:
                    (answered.update([outcome]) if ok else failures.append(outcome))

    workers = [threading.Thread(target=client) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=seconds + 60)
    return answered, failures


def test_both_replicas_answer_through_nginx_http_and_grpc(cluster, sample):
    _, _, replicas, balancer = cluster
    before = [predictions_counted(replica) for replica in replicas]
    answered, failures = hammer(balancer.url, sample["x_test"][:1].tolist(), threading.Event(), seconds=8, max_requests=400)
    assert not failures, failures[:3]
    after = [predictions_counted(replica) for replica in replicas]
    per_replica = [b - a for a, b in zip(before, after, strict=True)]
    assert all(count > 0 for count in per_replica), per_replica
    assert sum(per_replica) == sum(answered.values())
    assert set(answered) == {replica.url.removeprefix("http://") for replica in replicas}

    images = sample["x_test"][:2]
    with grpc.insecure_channel(replicas[0].grpc_target) as channel:
        direct = tf.make_ndarray(
            prediction_service_pb2_grpc.PredictionServiceStub(channel)
            .Predict(predict_request(images), timeout=30)
            .outputs["digit"]
        )
    with grpc.insecure_channel(balancer.grpc_target) as channel:  # TF Serving's gRPC API through nginx (HTTP/2)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for _ in range(6):
            response = stub.Predict(predict_request(images), timeout=30)
            assert tf.make_ndarray(response.outputs["digit"]).tolist() == direct.tolist()


def test_a_promotion_reaches_every_replica_within_the_poll_interval(cluster):
    registry, _, replicas, _ = cluster
    client = client_for(registry.tracking_uri)
    champion = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION)
    new = client.create_model_version(REGISTERED_MODEL, champion.source, run_id=champion.run_id)
    assert [served_version(replica) for replica in replicas] == [str(champion.version)] * 2

    client.set_registered_model_alias(REGISTERED_MODEL, CHAMPION, new.version)
    promoted = time.monotonic()
    waiting = set(range(len(replicas)))
    while waiting and time.monotonic() - promoted < POLL_SECONDS + 30:
        waiting = {n for n in waiting if served_version(replicas[n]) != str(new.version)}
        time.sleep(0.2)
    took = time.monotonic() - promoted
    assert not waiting, f"replicas {waiting} still serve version {champion.version} after {took:.1f}s"
    for replica in replicas:
        assert model_info(replica) == {str(champion.version): 0.0, str(new.version): 1.0}


def test_no_request_fails_while_a_replica_restarts(cluster, sample, tmp_path):
    _, env, replicas, balancer = cluster
    stop, results = threading.Event(), {}

    def load() -> None:
        results["answered"], results["failures"] = hammer(
            balancer.url, sample["x_test"][:1].tolist(), stop, seconds=240, max_requests=50000
        )

    loader = threading.Thread(target=load)
    loader.start()
    try:
        time.sleep(3)
        port = int(replicas[0].url.rsplit(":", 1)[1])
        grpc_port = replicas[0].grpc_target.rsplit(":", 1)[1]
        stop_process(replicas[0])  # SIGTERM, as docker stop and Kubernetes do
        time.sleep(3)  # the balancer sends everything to the other replica meanwhile
        replicas[0] = start_service({**env, "GRPC_PORT": grpc_port}, tmp_path / "replica-0-again" / "service.log", port=port)
        assert replicas[0].process.poll() is None, replicas[0].log()[-3000:]
        time.sleep(5)  # back in the pool: nginx tries it again after fail_timeout
    finally:
        stop.set()
        loader.join(timeout=120)
    answered, failures = results["answered"], results["failures"]
    assert not failures, f"{len(failures)} of {len(failures) + sum(answered.values())} failed: {failures[:3]}"
    assert sum(answered.values()) > 100
    assert predictions_counted(replicas[0]) > 0, "the restarted replica took no requests"


def test_every_metric_the_dashboard_plots_and_the_alerts_watch_is_one_a_replica_exposes(cluster):
    _, _, replicas, _ = cluster
    dashboard = json.loads((REPO_ROOT / "deploy" / "grafana" / "dashboards" / "digits.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    alerts = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    expressions += [rule["expr"] for group in alerts["groups"] for rule in group["rules"]]
    queried = {name for expr in expressions for name in re.findall(r"\b((?:bentoml|digits)_\w+)", expr)}
    # the challenger's series exist only with CHALLENGER_MODE on: tests/service/test_rollout_service.py checks them
    queried = {name for name in queried if not name.startswith(("digits_shadow_", "digits_challenger_"))}
    exposed = {sample.name for sample in metric_samples(replicas[1])}
    assert {"digits_predictions_total", "digits_prediction_confidence_sum_total"} <= queried
    assert queried <= exposed, queried - exposed


def _reload_from(balancer, source: str, token: str, forwarded_for: str | None = None) -> int:
    """POST /admin/reload through nginx from the loopback address ``source`` (Linux routes all of 127/8)."""
    host, port = balancer.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60, source_address=(source, 0))
    headers = {"Authorization": f"Bearer {token}", **({"X-Forwarded-For": forwarded_for} if forwarded_for else {})}
    try:
        connection.request("POST", "/admin/reload", headers=headers)
        return connection.getresponse().status
    finally:
        connection.close()


def test_the_admin_attempt_limit_counts_the_real_client_behind_the_balancer(cluster):
    """A guesser who changes X-Forwarded-For on every try is still counted as itself (nginx appends the
    address it saw; the replicas trust only nginx's), and the operator at another address is not locked out."""
    *_, balancer = cluster
    statuses = [_reload_from(balancer, "127.0.0.2", "wrong-token-wrong-token", f"203.0.113.{n}") for n in range(14)]
    # one counter per worker: two single-worker replicas allow 5 failures each before answering 429
    assert set(statuses) <= {401, 429} and statuses.count(429) >= 4, statuses
    assert _reload_from(balancer, "127.0.0.3", ADMIN_TOKEN) == 200


@pytest.mark.parametrize(("size", "limit"), [(16 * 1024 * 1024 + 1024, "16777216"), (18 * 1024 * 1024, "16777216")])
def test_an_over_limit_body_gets_a_json_413_through_the_balancer(cluster, size, limit):
    """Just over MAX_BODY_BYTES: the replica's own JSON answer passes nginx; past nginx's limit, nginx's JSON."""
    *_, balancer = cluster
    answer = requests.post(
        f"{balancer.url}/predict", data=b"[" + b"0," * (size // 2), headers={"Content-Type": "application/json"}, timeout=60
    )
    assert answer.status_code == 413 and answer.headers["Content-Type"].startswith("application/json"), answer.text[:300]
    assert limit in answer.json()["error"]
