# shellcheck shell=bash
# Shared by the SLURM scripts (sourced, never run): the project's Python and Ray, the
# ports of one job, and messages.
#
# Each job gets a block of 20 ports from its job id, so two jobs on one node never share
# one: 4 for the head (GCS, dashboard, Ray client, MLflow) and 6 per node, in two sets so
# that a second node on the same host (as in the tests) gets its own. Worker ports are left
# to the operating system.

ARTEFACT_PYTHON=${ARTEFACT_PYTHON:-$ARTEFACT_REPO/.venv/bin/python}
ARTEFACT_RAY=${ARTEFACT_RAY:-$(dirname "$ARTEFACT_PYTHON")/ray}

say() {
    printf '[artefact %s] %s\n' "$(date +%H:%M:%S)" "$*"
}

die() {
    printf '[artefact %s] error: %s\n' "$(date +%H:%M:%S)" "$*" >&2
    exit 2
}

# job_ports JOB_ID NODE_INDEX: sets GCS_PORT ... METRICS_PORT for that job and node.
job_ports() {
    local base=$((20000 + ($1 % 1000) * 20))
    local node=$((base + 4 + ($2 % 2) * 8))
    GCS_PORT=$base
    DASHBOARD_PORT=$((base + 1))
    CLIENT_PORT=$((base + 2))
    MLFLOW_PORT=$((base + 3))
    NODE_MANAGER_PORT=$node
    OBJECT_MANAGER_PORT=$((node + 1))
    RUNTIME_ENV_AGENT_PORT=$((node + 2))
    AGENT_GRPC_PORT=$((node + 3))
    AGENT_LISTEN_PORT=$((node + 4))
    METRICS_PORT=$((node + 5))
    export GCS_PORT DASHBOARD_PORT CLIENT_PORT MLFLOW_PORT NODE_MANAGER_PORT OBJECT_MANAGER_PORT \
        RUNTIME_ENV_AGENT_PORT AGENT_GRPC_PORT AGENT_LISTEN_PORT METRICS_PORT
}
