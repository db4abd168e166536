"""Prometheus alert rules (``deploy/prometheus/alerts.yml``): valid, loaded by the compose Prometheus,
and unit-tested with promtool (``alerts.test.yml``: each alert fires on a bad series, none on a healthy one)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import yaml

from tests.helpers import REPO_ROOT

PROMETHEUS = REPO_ROOT / "deploy" / "prometheus"
PROMTOOL = os.environ.get("PROMTOOL") or shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="needs promtool (.ci/run unpacks Debian's prometheus package)")


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120, cwd=PROMETHEUS)


@needs_promtool
def test_the_rules_and_the_config_that_loads_them_are_valid():
    rules = promtool("check", "rules", "alerts.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr
    config = promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0 and "1 rule files found" in config.stdout, config.stdout + config.stderr


@needs_promtool
def test_each_alert_fires_on_its_bad_series_and_none_on_a_healthy_service():
    run = promtool("test", "rules", "alerts.test.yml")
    assert run.returncode == 0, run.stdout + run.stderr


@needs_promtool
def test_promtool_catches_an_alert_that_does_not_fire(tmp_path):
    """The unit tests can fail: with the error threshold raised past the 10 % the test series carry,
    the error-rate case must fail."""
    loose = (
        (PROMETHEUS / "alerts.yml")
        .read_text()
        .replace("digits:prediction_requests:rate5m > 0.01", "digits:prediction_requests:rate5m > 0.5")
    )
    assert loose != (PROMETHEUS / "alerts.yml").read_text()
    (tmp_path / "alerts.yml").write_text(loose)
    (tmp_path / "alerts.test.yml").write_text((PROMETHEUS / "alerts.test.yml").read_text())
    run = subprocess.run(
        [PROMTOOL, "test", "rules", "alerts.test.yml"], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert run.returncode != 0 and "DigitsErrorRateHigh" in run.stdout + run.stderr


def test_every_alert_has_a_severity_and_words_for_the_person_it_wakes():
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    alerts = [rule for group in groups for rule in group["rules"] if "alert" in rule]
    assert {a["alert"] for a in alerts} >= {
        "DigitsErrorRateHigh",
        "DigitsLatencyOverSLO",
        "DigitsReplicasOnDifferentVersions",
        "DigitsConfidenceDropped",
        "DigitsClassShareShifted",
    }
    for alert in alerts:
        assert alert["labels"]["severity"] in {"page", "ticket"}, alert["alert"]
        assert alert["annotations"]["summary"] and alert["annotations"]["description"], alert["alert"]
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS / "alerts.test.yml").read_text()))
    assert {a["alert"] for a in alerts} <= tested, "every alert has a promtool test case"


def test_the_compose_prometheus_mounts_the_rules_beside_its_config():
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]["prometheus"]
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    assert "./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in compose["volumes"]
