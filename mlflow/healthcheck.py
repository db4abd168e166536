"""Container health: the API answers through the host name clients use (a name missing from
--allowed-hosts answers 403), signed in as the read-only service user when auth is on. The password
is read from the environment, so it never shows on a command line."""

import base64
import os
import sys
import urllib.request

request = urllib.request.Request(
    "http://127.0.0.1:5000/api/2.0/mlflow/experiments/search?max_results=1", headers={"Host": "mlflow:5000"}
)
password = os.environ.get("MLFLOW_SERVICE_PASSWORD")
if os.environ.get("MLFLOW_AUTH_ADMIN_PASSWORD") and password:
    request.add_header("Authorization", "Basic " + base64.b64encode(f"service:{password}".encode()).decode())
try:
    with urllib.request.urlopen(request, timeout=5) as answer:
        sys.exit(0 if answer.status == 200 else 1)
except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy"
    print(exc, file=sys.stderr)
    sys.exit(1)
