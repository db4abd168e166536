"""The compose stack's pieces as plain processes: PostgreSQL + ``mlflow server`` (started by
``mlflow/start.sh``, the compose command) + the pipeline over HTTP + the service loading the champion.

PostgreSQL comes from ``$TEST_POSTGRES_URL`` (``.ci/run`` installs and starts Debian's server and sets
it); the test creates and drops its own database, and skips with the reason when no server answers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid

import numpy as np
import pytest
import requests
import tensorflow as tf
import yaml

from service.launcher import REPO_ROOT, child_env, free_port, start_service, stop_service
from tests.conftest import SAMPLE_NPZ, last_json_line, run_pipeline

pytestmark = pytest.mark.slow
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(scope="module")
def postgres_database():
    psycopg = pytest.importorskip("psycopg")
    admin_url = os.environ.get("TEST_POSTGRES_URL", DEFAULT_URL)
    try:
        admin = psycopg.connect(admin_url, connect_timeout=5, autocommit=True)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL server at {admin_url} (set TEST_POSTGRES_URL; .ci/run starts one): {exc}".strip())
    name = f"mlflow_test_{uuid.uuid4().hex[:8]}"
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = admin_url.rpartition("/")
    yield f"{base}/{name}"
    with admin.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


@pytest.fixture(scope="module")
def tracking_server(postgres_database, tmp_path_factory):
    artifacts = tmp_path_factory.mktemp("artifacts")
    port = free_port()
    log_path = tmp_path_factory.mktemp("mlflow") / "mlflow.log"
    env = child_env({"MLFLOW_BACKEND_STORE_URI": postgres_database, "MLFLOW_ARTIFACTS_DESTINATION": artifacts.as_uri(),
                          "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "1",
                          "MLFLOW_SERVER_ALLOWED_HOSTS": f"127.0.0.1:{port},127.0.0.1,localhost:{port}"})
    with log_path.open("w") as log:
        process = subprocess.Popen(["sh", str(REPO_ROOT / "mlflow" / "start.sh")], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert process.poll() is None, log_path.read_text()[-3000:]
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(1)
        else:
            raise AssertionError(f"mlflow server did not come up:\n{log_path.read_text()[-3000:]}")
        yield url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)


def test_compose_uses_the_same_start_command():
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    dockerfile = (REPO_ROOT / "mlflow" / "Dockerfile").read_text()
    assert compose["services"]["mlflow"]["build"]["context"] == "./mlflow"
    assert "COPY start.sh /usr/local/bin/mlflow-start" in dockerfile and 'ENTRYPOINT ["mlflow-start"]' in dockerfile
    assert compose["services"]["service"]["environment"]["MODEL_URI"] == "models:/mnist-cnn@champion"


def test_server_refuses_host_names_it_does_not_list(tracking_server):
    search = f"{tracking_server}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(search, timeout=10).status_code == 200
    assert requests.get(search, headers={"Host": "elsewhere.example:5000"}, timeout=10).status_code == 403
    assert requests.get(f"{tracking_server}/health", headers={"Host": "elsewhere.example:5000"}, timeout=10).status_code == 200


def test_train_register_promote_and_serve_through_the_tracking_server(tracking_server, tmp_path, sample):
    env = {"MLFLOW_TRACKING_URI": tracking_server}
    trained = run_pipeline(["train", "--config", "seed", "--data", str(SAMPLE_NPZ), "--set", "epochs=1",
                            "--set", "registry.accuracy_floor=0.1", "--set", f"export.base_dir={tmp_path / 'exports'}"],
                           env, tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    result = last_json_line(trained.stdout)
    assert result["promoted"] is True

    service = start_service({**env, "MODEL_POLL_SECONDS": "0"}, tmp_path / "service.log")
    try:
        assert service.process.poll() is None, service.log()[-3000:]
        info = requests.get(f"{service.url}/model", timeout=10).json()
        assert info["version"] == result["model_version"] and info["run_id"] == result["run_id"]
        answer = requests.post(f"{service.url}/predict", json=sample["x_test"][:16].tolist(), timeout=30)
        assert answer.status_code == 200
        serve = tf.saved_model.load(result["export_path"]).signatures["serving_default"]
        expected = serve(pixels=tf.constant(sample["x_test"][:16]))["probabilities"].numpy()
        np.testing.assert_allclose([p["probabilities"] for p in answer.json()], expected, atol=1e-5)
        assert {p["model_version"] for p in answer.json()} == {result["model_version"]}
    finally:
        stop_service(service)
