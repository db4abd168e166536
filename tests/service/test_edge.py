"""The edge's route table and the admin rate limit, in-process."""

import pytest

from service import http
from service.edge import RouteTable
from service.http import FailedAttempts


@pytest.fixture(scope="module")
def table() -> RouteTable:
    return RouteTable(http.app.routes)


@pytest.mark.parametrize(("path", "label", "method"), [
    ("/predict", "/predict", "POST"),
    ("/predict_image", "/predict_image", "POST"),
    ("/model", "/model", "GET"),
    ("/draw", "/draw", "GET"),
    ("/livez", "/livez", "GET"),
    ("/metrics", "/metrics", "GET"),
    ("/v1/models/mnist:predict", "/v1/models/{model}:predict", "POST"),
    ("/v1/models/mnist/versions/7:predict", "/v1/models/{model}:predict", "POST"),
    ("/v1/models/mnist/versions/123456", "/v1/models/{model}", "GET"),
    ("/v1/models/mnist/metadata", "/v1/models/{model}/metadata", "GET"),
])
def test_known_paths_get_their_route_template(table, path, label, method):
    matched = table.match(path)
    assert matched is not None and matched[0] == label and method in matched[1]


@pytest.mark.parametrize("path", ["/", "/nope", "/predict/", "/v1/models/other:predict", "/v1/models/mnist:classify",
                                  "/static_content/../../etc/passwd", "/v1/models/mnist/versions/x"])
def test_other_paths_are_unmatched(table, path):
    if path == "/":
        assert table.match(path)[0] == "/"  # BentoML's Swagger UI
    else:
        assert table.match(path) is None


def test_failed_admin_attempts_lock_out_one_address_for_the_window():
    attempts = FailedAttempts(limit=3, window_s=60)
    for _ in range(3):
        assert attempts.retry_after("10.0.0.1") == 0
        attempts.failed("10.0.0.1")
    assert 0 < attempts.retry_after("10.0.0.1") <= 61
    assert attempts.retry_after("10.0.0.2") == 0  # others are not affected
    expired = FailedAttempts(limit=1, window_s=0.0)
    expired.failed("10.0.0.3")
    assert expired.retry_after("10.0.0.3") == 0
