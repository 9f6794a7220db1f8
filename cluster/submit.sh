#!/usr/bin/env bash
# Submit a sweep as one SLURM job, with the node's GPUs, CPUs and memory taken from the
# profile (resources.node_*), and print the job id, its log and the SSH tunnel commands.
#
#   cluster/submit.sh --profile v100s-x2 [--nodes 1] [--time 04:00:00] [--partition P]
#                     [--account A] [--log PATH] -- [encoder_bench.py arguments]
#
# The job's log goes to results/slurm-<job id>.log unless --log says otherwise (%j: job id).
#
# Example: cluster/submit.sh --profile v100s-x2 --time 08:00:00 -- --data /data/artefact --name convnext-vs-swin
set -euo pipefail

ARTEFACT_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export ARTEFACT_REPO
# shellcheck source=cluster/common.sh
source "$ARTEFACT_REPO/cluster/common.sh"

usage="usage: cluster/submit.sh --profile NAME [--nodes N] [--time HH:MM:SS] [--partition P] [--account A] [--log PATH] -- [sweep arguments]"
profile=""
nodes=1
time_limit=04:00:00
log_pattern=$ARTEFACT_REPO/results/slurm-%j.log
extra=()
while [ $# -gt 0 ]; do
    case $1 in
    --profile) profile=${2:?--profile needs a name}; shift 2 ;;
    --nodes) nodes=${2:?--nodes needs a number}; shift 2 ;;
    --time) time_limit=${2:?--time needs HH:MM:SS}; shift 2 ;;
    --partition) extra+=("--partition=${2:?--partition needs a name}"); shift 2 ;;
    --account) extra+=("--account=${2:?--account needs a name}"); shift 2 ;;
    --log) log_pattern=${2:?--log needs a path}; shift 2 ;;
    --) shift; break ;;
    -h | --help) echo "$usage"; exit 0 ;;
    *) die "unknown option $1; $usage" ;;
    esac
done
[ -n "$profile" ] || die "--profile is required; $usage"
[[ $nodes =~ ^[1-9][0-9]*$ ]] || die "--nodes $nodes: give a whole number of nodes, 1 or more"
[[ $time_limit =~ ^([0-9]+-)?[0-9]+(:[0-9]{2}){0,2}$ ]] || die "--time $time_limit: use SLURM's format, e.g. 04:00:00"
[ -x "$ARTEFACT_PYTHON" ] || die "no Python at $ARTEFACT_PYTHON: run 'make install' first, or set ARTEFACT_PYTHON"
for argument in "$@"; do
    case $argument in
    --profile | --profile=*) die "pass the profile as submit.sh --profile, not after --" ;;
    esac
done

# The profile's node as sbatch flags; then the sweep's own check, so a typo or a missing download
# fails now, not in the queue (=elsewhere: this login node need not have the job's GPUs).
read -r -a allocation <<<"$("$ARTEFACT_PYTHON" -m artefact allocation --profile "$profile")"
"$ARTEFACT_PYTHON" "$ARTEFACT_REPO/sweeps/encoder_bench.py" --check=elsewhere --profile "$profile" "$@" >/dev/null
mkdir -p "$(dirname "$log_pattern")"
job=$(sbatch --parsable --nodes="$nodes" --time="$time_limit" "${allocation[@]}" "${extra[@]}" \
    --chdir="$ARTEFACT_REPO" --export="ALL,ARTEFACT_REPO=$ARTEFACT_REPO" --output="$log_pattern" \
    "$ARTEFACT_REPO/cluster/sweep.sbatch" --profile "$profile" "$@")
job=${job%%;*}
job_ports "$job" 0
# shellcheck disable=SC2016  # printed for the user's shell to expand once the job runs
head='$(scontrol show hostnames "$(squeue -h -j '"$job"' -o %N)" | head -1)'
login=$(hostname -f 2>/dev/null || hostname)
echo "submitted job $job: ${allocation[*]} x $nodes node(s), time limit $time_limit"
echo "log:           ${log_pattern//%j/$job}"
echo "Ray dashboard: ssh -N -L $DASHBOARD_PORT:127.0.0.1:$DASHBOARD_PORT -J $login $head"
echo "               then http://127.0.0.1:$DASHBOARD_PORT"
echo "MLflow UI:     ssh -N -L $MLFLOW_PORT:127.0.0.1:$MLFLOW_PORT -J $login $head   (one-node jobs;"
echo "               the job log prints the exact command) then http://127.0.0.1:$MLFLOW_PORT"
