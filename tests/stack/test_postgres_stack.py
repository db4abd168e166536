"""The compose stack's pieces as plain processes: PostgreSQL + ``mlflow server`` (started by
``mlflow/start.sh``, the compose command, with basic auth on) + the pipeline over HTTP signed in as
``pipeline`` + the service loading the champion signed in as the read-only ``service``.

PostgreSQL comes from ``$TEST_POSTGRES_URL`` (``.ci/run`` installs and starts Debian's server and sets
it); the test creates and drops its own database, and skips with the reason when no server answers.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import psutil
import pytest
import requests
import tensorflow as tf
import yaml

from harness.launcher import REPO_ROOT, free_port, start_process, start_service, stop_process, stop_service
from tests.helpers import assert_same_answers, last_json_line, run_pipeline, seed_training

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class TrackingServer:
    url: str
    pid: int
    secrets: dict[str, str]

    def as_user(self, user: str) -> dict[str, str]:
        """The environment a client signed in as ``user`` (pipeline, service, admin) runs with."""
        password = self.secrets[
            {"pipeline": "MLFLOW_PIPELINE_PASSWORD", "service": "MLFLOW_SERVICE_PASSWORD", "admin": "MLFLOW_AUTH_ADMIN_PASSWORD"}[
                user
            ]
        ]
        return {"MLFLOW_TRACKING_URI": self.url, "MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}

    def auth(self, user: str) -> tuple[str, str]:
        env = self.as_user(user)
        return env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]


@pytest.fixture(scope="module")
def tracking_server(postgres_database, tmp_path_factory):
    artifacts = tmp_path_factory.mktemp("artifacts")
    port = free_port()
    home = tmp_path_factory.mktemp("mlflow")
    log_path = home / "mlflow.log"
    secrets = {
        name: uuid.uuid4().hex
        for name in (
            "MLFLOW_AUTH_ADMIN_PASSWORD",
            "MLFLOW_FLASK_SERVER_SECRET_KEY",
            "MLFLOW_PIPELINE_PASSWORD",
            "MLFLOW_SERVICE_PASSWORD",
        )
    }
    env = {
        "MLFLOW_BACKEND_STORE_URI": postgres_database,
        "MLFLOW_ARTIFACTS_DESTINATION": artifacts.as_uri(),
        "MLFLOW_HOST": "127.0.0.1",
        "MLFLOW_PORT": str(port),
        "MLFLOW_WORKERS": "1",
        "TMPDIR": str(home),
        "MLFLOW_SERVER_ALLOWED_HOSTS": f"127.0.0.1:{port},127.0.0.1,localhost:{port}",
        "MLFLOW_AUTH_DATABASE_URI": f"sqlite:///{home / 'basic_auth.db'}",
        **secrets,
    }
    server = start_process(["sh", str(REPO_ROOT / "mlflow" / "start.sh")], f"http://127.0.0.1:{port}", "/health", log_path, env)
    try:
        assert server.process.poll() is None, server.log()[-3000:]
        yield TrackingServer(server.url, server.process.pid, secrets)
    finally:
        stop_process(server, timeout=60)


def test_compose_uses_the_same_start_command():
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    dockerfile = (REPO_ROOT / "mlflow" / "Dockerfile").read_text()
    assert compose["services"]["mlflow"]["build"]["context"] == "./mlflow"
    assert "COPY start.sh /usr/local/bin/mlflow-start" in dockerfile and 'ENTRYPOINT ["mlflow-start"]' in dockerfile
    assert compose["services"]["service"]["environment"]["MODEL_URI"] == "models:/mnist-cnn@champion"


def test_server_refuses_host_names_it_does_not_list(tracking_server):
    search = f"{tracking_server.url}/api/2.0/mlflow/experiments/search?max_results=1"
    reader = tracking_server.auth("service")
    assert requests.get(search, auth=reader, timeout=10).status_code == 200
    assert requests.get(search, auth=reader, headers={"Host": "elsewhere.example:5000"}, timeout=10).status_code == 403
    assert (
        requests.get(f"{tracking_server.url}/health", headers={"Host": "elsewhere.example:5000"}, timeout=10).status_code == 200
    )


def test_anonymous_and_wrong_password_requests_are_rejected(tracking_server):
    api = f"{tracking_server.url}/api/2.0/mlflow"
    writes = [
        ("post", "experiments/create", {"json": {"name": "intruder"}}),
        ("post", "registered-models/alias", {"json": {"name": "mnist-cnn", "alias": "champion", "version": "1"}}),
        ("delete", "registered-models/delete", {"json": {"name": "mnist-cnn"}}),
    ]
    for method, path, kwargs in writes:
        for auth in (None, ("pipeline", "wrong-password"), ("admin", "wrong-password"), ("nobody", "x")):
            answer = getattr(requests, method)(f"{api}/{path}", auth=auth, timeout=10, **kwargs)
            assert answer.status_code == 401, (path, auth, answer.status_code, answer.text[:200])
    assert requests.get(f"{api}/experiments/search?max_results=1", timeout=10).status_code == 401


def test_no_secret_shows_on_a_command_line(tracking_server, postgres_database):
    password = postgres_database.split("://", 1)[1].split("@", 1)[0].partition(":")[2]
    secrets = [value for value in (password, *tracking_server.secrets.values()) if value]
    server = psutil.Process(tracking_server.pid)
    for process in [server, *server.children(recursive=True)]:
        command_line = " ".join(process.cmdline())
        assert not [secret for secret in secrets if secret in command_line], command_line


def test_train_register_promote_and_serve_through_the_tracking_server(tracking_server, tmp_path, sample):
    env = tracking_server.as_user("pipeline")
    trained = run_pipeline(
        seed_training(tmp_path / "exports", "registry.accuracy_floor=0.1"),
        env,
        tmp_path,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    result = last_json_line(trained.stdout)
    assert result["promoted"] is True

    service = start_service({**tracking_server.as_user("service"), "MODEL_POLL_SECONDS": "0"}, tmp_path / "service.log")
    try:
        assert service.process.poll() is None, service.log()[-3000:]
        info = requests.get(f"{service.url}/model", timeout=10).json()
        assert info["version"] == result["model_version"] and info["run_id"] == result["run_id"]
        answer = requests.post(f"{service.url}/predict", json=sample["x_test"][:16].tolist(), timeout=30)
        assert answer.status_code == 200
        serve = tf.saved_model.load(result["export_path"]).signatures["serving_default"]
        expected = serve(pixels=tf.constant(sample["x_test"][:16]))["probabilities"].numpy()
        assert_same_answers([p["probabilities"] for p in answer.json()], expected)
        assert {p["model_version"] for p in answer.json()} == {result["model_version"]}
    finally:
        stop_service(service)


def test_the_service_user_reads_but_cannot_move_the_champion_or_delete(tracking_server, tmp_path):
    """After the training above: the read-only user can resolve the champion, not change the registry."""
    api = f"{tracking_server.url}/api/2.0/mlflow"
    reader = tracking_server.auth("service")
    found = requests.get(
        f"{api}/registered-models/alias", params={"name": "mnist-cnn", "alias": "champion"}, auth=reader, timeout=10
    )
    assert found.status_code == 200, found.text
    version = found.json()["model_version"]["version"]
    moved = requests.post(
        f"{api}/registered-models/alias",
        auth=reader,
        timeout=10,
        json={"name": "mnist-cnn", "alias": "champion", "version": version},
    )
    assert moved.status_code == 403, moved.text
    deleted = requests.delete(f"{api}/registered-models/delete", auth=reader, json={"name": "mnist-cnn"}, timeout=10)
    assert deleted.status_code == 403, deleted.text
    promote = run_pipeline(["promote", version], tracking_server.as_user("service"), tmp_path)
    assert promote.returncode == 2 and "Permission denied" in promote.stderr and "Traceback" not in promote.stderr
    assert run_pipeline(["promote", version], tracking_server.as_user("pipeline"), tmp_path).returncode == 0


def test_the_service_user_cannot_create_anything_not_even_the_gate_lock(tracking_server):
    """MLflow lets any signed-in user create experiments and registered models; the read-only user is
    refused (mlflow/read_only_auth.py), so it cannot plant a gate lock that stalls every training."""
    api = f"{tracking_server.url}/api/2.0/mlflow"
    reader, trainer = tracking_server.auth("service"), tracking_server.auth("pipeline")
    creates = [
        ("registered-models/create", {"name": "mnist-cnn--gate-lock", "tags": [{"key": "acquired_at", "value": "9999999999"}]}),
        ("experiments/create", {"name": "planted-by-service"}),
        ("runs/create", {"experiment_id": "0"}),
    ]
    for path, body in creates:
        answer = requests.post(f"{api}/{path}", auth=reader, json=body, timeout=10)
        assert answer.status_code == 403, (path, answer.status_code, answer.text[:300])
        assert answer.json()["error_code"] == "PERMISSION_DENIED" and "read-only" in answer.json()["message"]
    searched = requests.post(f"{api}/runs/search", auth=reader, json={"experiment_ids": ["0"], "max_results": 1}, timeout=10)
    assert searched.status_code == 200, searched.text[:300]  # searches are reads, even as POSTs
    lock = requests.get(f"{api}/registered-models/get", params={"name": "mnist-cnn--gate-lock"}, auth=trainer, timeout=10)
    assert lock.status_code == 404, lock.text[:300]
    created = requests.post(f"{api}/experiments/create", auth=trainer, json={"name": "made-by-pipeline"}, timeout=10)
    assert created.status_code == 200, created.text[:300]


def test_compose_tuners_share_one_study_in_its_own_postgres_database():
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    tuner, postgres = compose["services"]["tuner"], compose["services"]["postgres"]
    assert tuner["command"][:4] == ["python", "-m", "pipeline", "tune"] and tuner["profiles"] == ["tune"]
    assert tuner["environment"]["OPTUNA_STORAGE"].endswith("@postgres:5432/optuna")
    init = [volume for volume in postgres["volumes"] if volume.endswith(":/docker-entrypoint-initdb.d:ro")]
    assert init and "CREATE DATABASE optuna" in (REPO_ROOT / init[0].split(":")[0] / "optuna.sql").read_text()
