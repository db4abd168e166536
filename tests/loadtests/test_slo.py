"""Judging a load test against its SLOs, and reading Locust's CSV, in-process."""

from __future__ import annotations

import csv

import pytest

from loadtests.run import aggregated, judge, load_profiles

STATS = {
    "requests": 1000,
    "failures": 5,
    "failure_ratio": 0.005,
    "requests_per_s": 120.0,
    "p50_ms": 20.0,
    "p95_ms": 60.0,
    "p99_ms": 150.0,
    "avg_ms": 25.0,
}


def test_a_run_within_every_slo_passes():
    assert judge(STATS, {"max_failure_ratio": 0.01, "p50_ms": 50, "p99_ms": 200, "min_rps": 100}) == []


@pytest.mark.parametrize(
    ("slo", "broken"),
    [
        ({"max_failure_ratio": 0.001}, "failure ratio 0.0050 > 0.001"),
        ({"p50_ms": 10}, "p50 latency 20 ms > 10 ms"),
        ({"p99_ms": 100}, "p99 latency 150 ms > 100 ms"),
        ({"min_rps": 200}, "throughput 120.0 requests/s < 200"),
    ],
)
def test_each_broken_slo_is_named_with_its_figures(slo, broken):
    assert judge(STATS, slo) == [broken]


def test_an_empty_slo_judges_nothing():
    assert judge(STATS, {}) == []


def test_every_profile_has_a_description_users_and_an_slo():
    for name, profile in load_profiles().items():
        assert profile["description"] and profile["user_classes"], name
        assert set(profile.get("slo") or {}) <= {"max_failure_ratio", "p50_ms", "p99_ms", "min_rps"}, name


def test_the_aggregated_row_of_locusts_csv_is_read_and_na_latencies_read_as_zero(tmp_path):
    header = ["Type", "Name", "Request Count", "Failure Count", "Requests/s", "50%", "95%", "99%", "Average Response Time"]
    with (tmp_path / "locust_stats.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerow(["POST", "/predict", "10", "0", "5.0", "12", "30", "40", "14.5"])
        writer.writerow(["", "Aggregated", "10", "2", "5.0", "N/A", "30", "40", "14.5"])
    stats = aggregated(tmp_path)
    assert stats["failure_ratio"] == pytest.approx(0.2) and stats["p50_ms"] == 0.0 and stats["p99_ms"] == 40.0
