#!/usr/bin/env bash
# Set up (offline) and run the demo: 10 SuperNodes on Ray, 3 of them contaminated, under CLAIR.
# Usage: [STRATEGY=fedavg] bash scripts/demo.sh [extra --run-config overrides, e.g. "num-server-rounds=3"]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/flwr ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet torch==2.13.0
  .venv/bin/pip install --quiet -e ".[dev]"
fi
. .venv/bin/activate
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
export FLWR_HOME="${FLWR_HOME:-$PWD/.cache/flwr-home}"
out="${CLAIR_FLOWER_OUTPUT:-$PWD/outputs}/demo-$(date +%Y%m%d-%H%M%S)"

# flwr run leaves its local SuperLink running: stop the one this script's FLWR_HOME started,
# also when the run fails.
trap 'python -c "from clair_flower.server_apps.local_superlink import stop_pids, superlink_pids; stop_pids(superlink_pids('\''$FLWR_HOME'\''))"' EXIT

flwr run . --stream \
  --run-config "strategy='${STRATEGY:-clair}' attack='random' attack-fraction=0.3 output-dir='$out' ${1:-}" \
  --federation-config "num-supernodes=10 client-resources-num-cpus=1"
echo "Results: $out (summary.md, summary.json, rounds.jsonl, *.png)"
