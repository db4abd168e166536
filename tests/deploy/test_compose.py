"""The compose file: valid with every profile (Debian's ``docker-compose config``), limits on every
service, and the service scalable behind the load balancer."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from harness.launcher import NGINX_TEMPLATE, REPO_ROOT

COMPOSE = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
PROFILES = sorted({profile for service in SERVICES.values() for profile in service.get("profiles", [])})
REQUIRED = re.findall(r"\$\{(\w+):\?", (REPO_ROOT / "docker-compose.yml").read_text())


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="needs docker-compose (.ci/run installs it)")
@pytest.mark.parametrize("profile", [None, *PROFILES])
def test_compose_config_validates_with_every_profile(profile, tmp_path):
    env = {"PATH": "/usr/bin:/bin", **{name: "validation-only" for name in REQUIRED}}
    command = [
        "docker-compose",
        "-f",
        str(REPO_ROOT / "docker-compose.yml"),
        *(["--profile", profile] if profile else []),
        "config",
        "-q",
    ]
    checked = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stderr


def test_every_service_has_cpu_and_memory_limits():
    for name, service in SERVICES.items():
        limits = service.get("deploy", {}).get("resources", {}).get("limits", {})
        assert {"cpus", "memory"} <= set(limits), name


def test_the_service_scales_behind_the_load_balancer():
    service, balancer = SERVICES["service"], SERVICES["lb"]
    assert "ports" not in service, "a fixed host port stops `--scale service=N`"
    assert "container_name" not in service
    assert (
        service["environment"]["MODEL_URI"] == "models:/mnist-cnn@champion"
        and float(service["environment"]["MODEL_POLL_SECONDS"]) > 0
    )
    assert balancer["image"].startswith("nginx:")
    assert "./deploy/nginx/templates:/etc/nginx/templates:ro" in balancer["volumes"]
    assert "resolve" in balancer["environment"]["HTTP_UPSTREAMS"] and "service:3000" in balancer["environment"]["HTTP_UPSTREAMS"]
    assert "service:8500" in balancer["environment"]["GRPC_UPSTREAMS"]
    template_variables = set(re.findall(r"\$\{(\w+)\}", NGINX_TEMPLATE.read_text()))
    assert template_variables == {key for key in balancer["environment"]}
    assert SERVICES["locust"]["command"][SERVICES["locust"]["command"].index("--host") + 1] == "http://lb:8080"


def test_monitoring_scrapes_the_replicas_and_the_dashboard_is_provisioned():
    prometheus = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    job = prometheus["scrape_configs"][0]
    assert job["dns_sd_configs"][0]["names"] == ["service"] and job["dns_sd_configs"][0]["port"] == 3000
    dashboard = json.loads((REPO_ROOT / "deploy" / "grafana" / "dashboards" / "digits.json").read_text())
    titles = " ".join(panel["title"] for panel in dashboard["panels"]).lower()
    for needed in ("requests/s", "latency", "batch size", "model version per replica"):
        assert needed in titles
    assert all(SERVICES[name]["profiles"] == ["monitoring"] for name in ("prometheus", "grafana"))
