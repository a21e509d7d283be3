#!/usr/bin/env bash
# MLflow tracking server for a team: runs in PostgreSQL, artifacts in an S3-compatible store
# (AWS S3, MinIO, Ceph), both reached by the server only (--serve-artifacts), so that trials on
# any node, and people's browsers, need nothing but HTTP access to this server.
#
#   MLFLOW_BACKEND_STORE_URI=postgresql://mlflow:PASSWORD@db.internal:5432/mlflow \
#   MLFLOW_ARTIFACTS_DESTINATION=s3://probesweep-mlflow/artifacts \
#   cluster/mlflow/server-team.sh
#
# Settings (environment):
#   MLFLOW_BACKEND_STORE_URI      required: postgresql://USER:PASSWORD@HOST:PORT/DB
#   MLFLOW_ARTIFACTS_DESTINATION  required: s3://BUCKET/PREFIX
#   MLFLOW_S3_ENDPOINT_URL        for an S3-compatible store other than AWS (http://minio:9000)
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (or an instance role): the bucket's credentials
#   MLFLOW_HOST                   address to listen on (default 127.0.0.1: put a reverse proxy
#                                 with TLS and authentication in front, see docs/cluster.md)
#   MLFLOW_PORT                   port (default 5000)
#   MLFLOW_ALLOWED_HOSTS          Host headers accepted, e.g. "mlflow.internal,mlflow.internal:5000"
#   MLFLOW_WORKERS                server worker processes (default 4)
#   MLFLOW_BIN                    the mlflow executable (default: mlflow on PATH)
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION  MLflow's job runner, for its GenAI features (issue detection,
#                     GenAI evaluation, online scoring), which probe sweeps do not use (default
#                     false here; MLflow's own default, true, starts 8 more processes)
# The server needs `pip install 'psycopg[binary]' boto3` beside mlflow==3.17.2 (SQLAlchemy 2.1
# reads postgresql:// with psycopg 3; postgresql+psycopg2:// selects psycopg2 instead).
set -euo pipefail

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI=postgresql://USER:PASSWORD@HOST:PORT/DB}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION=s3://BUCKET/PREFIX}"
case "$MLFLOW_BACKEND_STORE_URI" in
  postgresql://*|postgresql+psycopg://*|postgresql+psycopg2://*) ;;
  *) echo "MLFLOW_BACKEND_STORE_URI must be a postgresql:// URI, got ${MLFLOW_BACKEND_STORE_URI%%://*}://..." >&2; exit 2 ;;
esac
case "$MLFLOW_ARTIFACTS_DESTINATION" in
  s3://*) ;;
  *) echo "MLFLOW_ARTIFACTS_DESTINATION must be an s3:// URI, got $MLFLOW_ARTIFACTS_DESTINATION" >&2; exit 2 ;;
esac

extra=()
if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
  extra+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi

# MLflow's job runner serves GenAI features only (see MLFLOW_SERVER_ENABLE_JOB_EXECUTION above)
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
exec "${MLFLOW_BIN:-mlflow}" server \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --serve-artifacts --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
  --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}" --workers "${MLFLOW_WORKERS:-4}" \
  "${extra[@]}"
