"""Packaging the BentoML way: ``bentoml build`` makes a Bento of the service's files with locked
requirements, and that Bento serves the champion."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import requests

from harness.launcher import REPO_ROOT, child_env, free_port, start_process, stop_process
from tests.helpers import BENTO_USER_UID


def requirement_lines(path: Path) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()]


def test_the_service_requirements_carry_the_projects_bounds():
    declared = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    bounds = {re.split(r"[<>=!~\[]", spec, maxsplit=1)[0]: spec for spec in declared}
    for requirement in requirement_lines(REPO_ROOT / "service" / "requirements.txt"):
        name = re.split(r"[<>=!~\[]", requirement, maxsplit=1)[0]
        assert bounds.get(name) == requirement, f"service/requirements.txt {requirement!r} vs pyproject.toml {bounds.get(name)!r}"


@pytest.mark.slow
def test_bentoml_build_makes_a_locked_bento_that_serves_the_champion(trained_registry, sample, tmp_path):
    env = {"BENTOML_HOME": str(tmp_path / "bentoml")}
    built = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "-o", "tag", str(REPO_ROOT)],
        cwd=REPO_ROOT,
        env=child_env(env),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    tag = re.search(r"__tag__:(\S+?)(?:ERROR|$)", built.stdout, re.M).group(1)
    name, version = tag.split(":")
    bento = tmp_path / "bentoml" / "bentos" / name / version
    source = {path.relative_to(bento / "src").as_posix() for path in (bento / "src").rglob("*") if path.is_file()}
    assert {
        "service/service.py",
        "service/runtime.py",
        "service/static/draw.html",
        "service/data/calibration-digits.npz",
        "contract.py",
        "quiet.py",
    } <= source
    assert not any(path.startswith(("tests/", "pipeline/", "loadtests/", ".venv/")) for path in source), sorted(source)[:20]
    assert (
        f"ARG BENTO_USER_UID={BENTO_USER_UID}" in (bento / "env" / "docker" / "Dockerfile").read_text()
    )  # deploy/k8s runs as it
    locked = requirement_lines(bento / "env" / "python" / "requirements.txt")
    pins = {line.split("==")[0].lower() for line in locked if "==" in line}
    assert {"tensorflow", "bentoml", "mlflow", "tensorflow-serving-api", "grpcio"} <= pins
    assert all("==" in line for line in locked if not line.startswith(("-", "--"))), [
        line for line in locked if "==" not in line
    ][:5]

    port = free_port()
    served = start_process(
        [sys.executable, "-m", "bentoml", "serve", tag, "--host", "127.0.0.1", "--port", str(port)],
        f"http://127.0.0.1:{port}",
        "/readyz",
        tmp_path / "bento-serve.log",
        {**env, **trained_registry.env, "GRPC_PORT": "0", "PYTHONPATH": ""},
        cwd=tmp_path,  # not the repository: the code comes from the Bento
    )
    try:
        assert served.process.poll() is None, served.log()[-3000:]
        answer = requests.post(f"{served.url}/predict", json=sample["x_test"][:4].tolist(), timeout=30)
        assert answer.status_code == 200, answer.text
        assert [p["model_version"] for p in answer.json()] == [trained_registry.result["model_version"]] * 4
    finally:
        stop_process(served)
