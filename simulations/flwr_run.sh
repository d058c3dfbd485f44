#!/usr/bin/env bash
# `flwr run .` on a local simulation SuperLink that this script owns and always stops.
#
# Flower's managed local SuperLink would (1) `uv sync` the app's dependencies into a fresh
# environment, downloading a CUDA build of torch of several GB, and (2) stay running in the
# background after the run. Here the SuperLink runs with runtime dependency installation
# disabled, so the ServerApp and ClientApps use this environment, and it is stopped by PID
# when the run ends, fails or is interrupted.
#
# usage: simulations/flwr_run.sh [HOSPITALS] [more `flwr run` options, e.g. --run-config ...]
#   simulations/flwr_run.sh                      # the default: 3 hospitals
#   simulations/flwr_run.sh 10 --run-config simulations/scenarios/ten_hospitals.toml
set -euo pipefail
cd "$(dirname "$0")/.."
hospitals="${1:-3}"
[[ $# -gt 0 ]] && shift
port="${FLWR_LOCAL_SUPERLINK_HTTP_API_PORT:-39091}"
health="http://127.0.0.1:${port}/health"
probe() { python -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)" "$health" 2>/dev/null; }

if probe; then
    echo "error: a SuperLink already answers on 127.0.0.1:${port}; stop it first (it may install dependencies at run time)" >&2
    exit 1
fi
log="$(mktemp -t medtune-superlink.XXXXXX.log)"
flower-superlink --insecure --simulation --disable-runtime-dependency-installation \
    --isolation subprocess --host 127.0.0.1 --port "$port" \
    --control-api-address "127.0.0.1:${FLWR_LOCAL_CONTROL_API_PORT:-39093}" >"$log" 2>&1 &
superlink=$!
trap 'kill -TERM "$superlink" 2>/dev/null; wait "$superlink" 2>/dev/null || true' EXIT INT TERM
for _ in $(seq 60); do probe && break; sleep 0.5; done
probe || { echo "error: the SuperLink did not start; its log: $log" >&2; exit 1; }

FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 flwr run . local --stream \
    --federation-config "num-supernodes=${hospitals} client-resources-num-cpus=1" "$@"
