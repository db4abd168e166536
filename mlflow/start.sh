#!/bin/sh
# MLflow tracking server: PostgreSQL backend store, artifacts proxied to S3 (or any artifact URI).
# The same command runs in the compose stack and in the integration test (tests/stack).
#
# Secrets come from the environment and never reach a command line (ps shows command lines):
#   MLFLOW_BACKEND_STORE_URI (holds the database password) and MLFLOW_ARTIFACTS_DESTINATION are read
#   by `mlflow server` itself; AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (a MinIO key for the bucket
#   only, not MinIO's root) and MLFLOW_S3_ENDPOINT_URL by boto3. Clients need no S3 key: the server
#   proxies artifacts (--serve-artifacts).
# --allowed-hosts must list the host names clients use (mlflow:5000 in compose): others get 403,
# while /health still answers 200.
#
# Authentication (MLflow's basic-auth app) is on when MLFLOW_AUTH_ADMIN_PASSWORD is set:
#   MLFLOW_FLASK_SERVER_SECRET_KEY   required with it
#   MLFLOW_AUTH_DATABASE_URI         users and permissions [sqlite:////var/lib/mlflow-auth/basic_auth.db]
#   MLFLOW_PIPELINE_PASSWORD         user `pipeline`: trains; owns (MANAGE) what it creates
#   MLFLOW_SERVICE_PASSWORD          user `service`: reads only
#   MLFLOW_AUTH_CACHE_TTL_S          seconds a verified user/password pair is trusted without hashing again
#                                    [60]; 0 checks every request (MLflow's scrypt check costs about
#                                    0.17 s of CPU, on every API call of a training); a changed password
#                                    takes up to this long to lock out the old one on other workers
#   MLFLOW_READ_ONLY_USERS           users refused every write, creating included [service]
#                                    (read_only_auth.py: MLflow lets any signed-in user create experiments
#                                    and registered models, the trainers' gate lock among them)
# Everyone else, and anonymous requests, get 401; the default permission for signed-in users is READ.
set -eu
: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI, e.g. postgresql://mlflow:PASSWORD@postgres:5432/mlflow}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION, e.g. s3://mlflow-artifacts}"
export MLFLOW_BACKEND_STORE_URI MLFLOW_ARTIFACTS_DESTINATION
here=$(dirname "$0")

if [ -n "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ]; then
  : "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY with MLFLOW_AUTH_ADMIN_PASSWORD}"
  MLFLOW_AUTH_CONFIG_PATH=$(mktemp "${TMPDIR:-/tmp}/mlflow-auth.XXXXXX")
  cat > "$MLFLOW_AUTH_CONFIG_PATH" <<INI
[mlflow]
default_permission = READ
database_uri = ${MLFLOW_AUTH_DATABASE_URI:-sqlite:////var/lib/mlflow-auth/basic_auth.db}
admin_username = admin
authorization_function = read_only_auth:authenticate
auth_cache_ttl_seconds = ${MLFLOW_AUTH_CACHE_TTL_S:-60}
INI
  export MLFLOW_AUTH_CONFIG_PATH
  export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
  python3 "$here/users.py"
  set -- --app-name basic-auth "$@"
fi

exec mlflow server \
  --serve-artifacts \
  --host "${MLFLOW_HOST:-0.0.0.0}" \
  --port "${MLFLOW_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-2}" \
  --allowed-hosts "${MLFLOW_SERVER_ALLOWED_HOSTS:-localhost,127.0.0.1,mlflow,mlflow:5000,localhost:5000,127.0.0.1:5000}" \
  "$@"
