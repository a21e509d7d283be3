#!/usr/bin/env bash
# MLflow tracking server for one host: an SQLite store and artifacts on local disk, served over
# HTTP (clients upload artifacts through the server, so trials on other nodes need no shared disk).
#
#   cluster/mlflow/server-single-host.sh            # 127.0.0.1:5000, data in ./mlflow-server
#
# Settings (environment):
#   MLFLOW_DATA_DIR   where mlflow.db and artifacts/ live      (default ./mlflow-server)
#   MLFLOW_HOST       address to listen on                     (default 127.0.0.1: this host only)
#   MLFLOW_PORT       port                                     (default 5000)
#   MLFLOW_ALLOWED_HOSTS  Host headers the server accepts when MLFLOW_HOST is not loopback,
#                     e.g. "mlflow.internal:5000"; see docs/cluster.md before exposing it.
#   MLFLOW_BIN        the mlflow executable                    (default: mlflow on PATH)
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION  MLflow's job runner, for its GenAI features (issue detection,
#                     GenAI evaluation, online scoring), which probe sweeps do not use (default
#                     false here; MLflow's own default, true, starts 8 more processes)
#
# The server runs in the foreground; it and its workers stop together on SIGTERM to its process
# group (`kill -- -PID`).
set -euo pipefail

data_dir=$(mkdir -p "${MLFLOW_DATA_DIR:-$PWD/mlflow-server}" && cd "${MLFLOW_DATA_DIR:-$PWD/mlflow-server}" && pwd)
host=${MLFLOW_HOST:-127.0.0.1}
port=${MLFLOW_PORT:-5000}
mkdir -p "$data_dir/artifacts"

extra=()
if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
  extra+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi

# MLflow's job runner serves GenAI features only (see MLFLOW_SERVER_ENABLE_JOB_EXECUTION above)
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
exec "${MLFLOW_BIN:-mlflow}" server \
  --backend-store-uri "sqlite:///$data_dir/mlflow.db" \
  --serve-artifacts --artifacts-destination "$data_dir/artifacts" \
  --host "$host" --port "$port" --workers 2 \
  "${extra[@]}"
