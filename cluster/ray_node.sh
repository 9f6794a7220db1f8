#!/usr/bin/env bash
# Start one Ray node of a job and block until it stops (SIGTERM stops it and its processes).
#
#   ray_node.sh head IP          the head, on IP, with the dashboard on 127.0.0.1 only
#   ray_node.sh worker HEAD_IP   a worker that joins the head at HEAD_IP
#
# Needs ARTEFACT_JOB_ID (the SLURM job id by default), RAY_AUTH_TOKEN_PATH (the job's
# token file, mode 600) and RAY_TMPDIR. CPUs and GPUs come from the allocation on this
# node (SLURM_CPUS_ON_NODE, CUDA_VISIBLE_DEVICES), not from the machine.
set -euo pipefail

ARTEFACT_REPO=${ARTEFACT_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
# shellcheck source=cluster/common.sh
source "$ARTEFACT_REPO/cluster/common.sh"

role=${1:-}
address=${2:-}
[ "$role" = head ] || [ "$role" = worker ] || die "usage: ray_node.sh head|worker IP"
[ -n "$address" ] || die "ray_node.sh $role: give the head's IP address"
job=${ARTEFACT_JOB_ID:-${SLURM_JOB_ID:-}}
[ -n "$job" ] || die "ray_node.sh: no job id (run it inside a SLURM job, or set ARTEFACT_JOB_ID)"
token=${RAY_AUTH_TOKEN_PATH:-}
[ -n "$token" ] || die "ray_node.sh on $(hostname -s): RAY_AUTH_TOKEN_PATH is not set; the job's token file is needed to join"
[ -r "$token" ] || die "ray_node.sh on $(hostname -s): the token file $token is missing or unreadable; it must be on a file system every node sees"
[ -n "${RAY_TMPDIR:-}" ] || die "ray_node.sh: RAY_TMPDIR is not set (use a short path such as /tmp/ray-\$SLURM_JOB_ID)"
export RAY_AUTH_MODE=token
# Stopping a node drains it for 30 s by default; the job stops Ray only once the sweep is over.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-0}
# No idle worker per CPU started ahead: trials never use them (NO_IDLE_WORKERS_ENV, artefact/tune/ray_env.py).
export RAY_enable_worker_prestart=0 RAY_prestart_worker_first_driver=0

cpus=${SLURM_CPUS_ON_NODE:-$(getconf _NPROCESSORS_ONLN)}
gpus=0
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    IFS=, read -r -a devices <<<"$CUDA_VISIBLE_DEVICES"
    gpus=${#devices[@]}
fi

job_ports "$job" "${SLURM_NODEID:-0}"
common=(
    --block
    --num-cpus="$cpus"
    --num-gpus="$gpus"
    --node-manager-port="$NODE_MANAGER_PORT"
    --object-manager-port="$OBJECT_MANAGER_PORT"
    --runtime-env-agent-port="$RUNTIME_ENV_AGENT_PORT"
    --dashboard-agent-grpc-port="$AGENT_GRPC_PORT"
    --dashboard-agent-listen-port="$AGENT_LISTEN_PORT"
    --metrics-export-port="$METRICS_PORT"
    --disable-usage-stats
)
mkdir -p "$RAY_TMPDIR"
if [ "$role" = head ]; then
    say "Ray head on $address:$GCS_PORT with $cpus CPUs and $gpus GPUs"
    exec "$ARTEFACT_RAY" start --head --node-ip-address="$address" --port="$GCS_PORT" \
        --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --ray-client-server-port="$CLIENT_PORT" \
        --temp-dir="$RAY_TMPDIR" "${common[@]}"
fi
node_ip=${ARTEFACT_NODE_IP:-$(hostname --ip-address | awk '{print $1}')}
say "Ray worker on $(hostname -s) ($node_ip) joining $address:$GCS_PORT with $cpus CPUs and $gpus GPUs"
exec "$ARTEFACT_RAY" start --address="$address:$GCS_PORT" --node-ip-address="$node_ip" --temp-dir="$RAY_TMPDIR" \
    "${common[@]}"
