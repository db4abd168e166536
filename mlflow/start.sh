#!/bin/sh
# MLflow tracking server: PostgreSQL backend store, artifacts proxied to S3 (or any artifact URI).
# The same command runs in the compose stack and in the integration test (tests/stack).
# S3 access: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, MLFLOW_S3_ENDPOINT_URL (MinIO); clients need none,
# since the server proxies artifacts (--serve-artifacts).
# --allowed-hosts must list the host names clients use (mlflow:5000 in compose): others get 403,
# while /health still answers 200.
# Optional basic auth: pass --app-name basic-auth and set MLFLOW_AUTH_ADMIN_PASSWORD and
# MLFLOW_FLASK_SERVER_SECRET_KEY (no defaults).
set -eu
: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI, e.g. postgresql://mlflow:PASSWORD@postgres:5432/mlflow}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION, e.g. s3://mlflow-artifacts}"
exec mlflow server \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
  --serve-artifacts \
  --host "${MLFLOW_HOST:-0.0.0.0}" \
  --port "${MLFLOW_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-2}" \
  --allowed-hosts "${MLFLOW_SERVER_ALLOWED_HOSTS:-localhost,127.0.0.1,mlflow,mlflow:5000,localhost:5000,127.0.0.1:5000}" \
  "$@"
