#!/usr/bin/env bash
# Submit a loft-dist command to a running Ray cluster as a Ray job.
#
#   cluster/submit.sh CONFIG [key=value ...]
#
# RAY_ADDRESS         the cluster's job API (default http://127.0.0.1:8265, e.g. a port-forward
#                     of cluster/raycluster.yaml's head service)
# LOFT_DIST_COMMAND   the loft-dist command (default run; e.g. prepare, or report with a run dir)
# RUNTIME_ENV_JSON    Ray runtime env (default: unbuffered Python output, so `ray job logs` is live)
#
# Token authentication (Ray's default for a `ray start` head where a token exists; always on for the manifests in
# cluster/): the token is read where Ray reads it, RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names, else
# ~/.ray/auth_token. The client follows the cluster: RAY_AUTH_MODE is set to the mode the job API reports, so a
# token is sent exactly when the cluster asks for one. A missing or rejected token stops here with one line saying
# where the token is expected, before anything is uploaded. The token is never printed.
#
# The repository is uploaded as the job's working dir: CONFIG and code changes travel with the
# job without rebuilding the image. Run paths (run.storage_path) are paths on the cluster.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: $0 CONFIG [key=value ...]" >&2
  echo "  e.g. RAY_ADDRESS=http://127.0.0.1:8265 $0 configs/cifar100_lt_loft.yaml run.name=exp1 run.storage_path=/mnt/shared/runs" >&2
  exit 2
fi
CONFIG="$1"
shift

# --working-dir . must be the repository root, whatever directory the script is called from.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# A YAML config travels in the upload, so it must be here; other arguments (e.g. the run dir
# of `report`) are paths on the cluster.
if [[ "$CONFIG" == *.yaml || "$CONFIG" == *.yml ]] && [[ ! -f "$CONFIG" ]]; then
  echo "error: config $CONFIG not found under $(pwd) (give it relative to the repository root)" >&2
  exit 2
fi

if ! command -v ray > /dev/null; then
  echo 'error: the ray CLI is not on PATH; pip install "ray[default]==2.60.0" (the version of the cluster)' >&2
  exit 2
fi

ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
if [[ "$ADDRESS" == http://* || "$ADDRESS" == https://* ]]; then
  PYTHON="$(command -v python3 || command -v python || echo python3)"
  MODE="$("$PYTHON" cluster/check_token.py "$ADDRESS")" || exit 2
  export RAY_AUTH_MODE="$MODE"
fi

DEFAULT_RUNTIME_ENV='{"env_vars": {"PYTHONUNBUFFERED": "1"}}'
exec ray job submit \
  --address "$ADDRESS" \
  --working-dir . \
  --runtime-env-json "${RUNTIME_ENV_JSON:-$DEFAULT_RUNTIME_ENV}" \
  -- loft-dist "${LOFT_DIST_COMMAND:-run}" "$CONFIG" "$@"
