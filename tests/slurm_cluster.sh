#!/usr/bin/env bash
# A real one-node SLURM cluster for the tests: munged, slurmctld and slurmd from Debian,
# with every key, socket, state, pid and log file under one folder, no cgroups, and a fake
# GPU (GRES backed by /dev/null). See FACTS.md, "SLURM, real, on these machines".
#
#   tests/slurm_cluster.sh start DIR      write the config and start the daemons
#   tests/slurm_cluster.sh stop DIR       cancel the jobs, then stop the daemons by their pid files
#
# Clients use the cluster with SLURM_CONF=DIR/slurm.conf. tests/system_deps.sh installs the
# daemons.
set -euo pipefail
# shellcheck source=tests/slurm_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/slurm_common.sh"

command=${1:?usage: slurm_cluster.sh start DIR|stop DIR}

start() {
    local dir=$1
    local host cpus memory_mb
    host=$(hostname -s)
    cpus=$(getconf _NPROCESSORS_ONLN)  # not nproc: it honours OMP_NUM_THREADS
    memory_mb=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024))
    mkdir -p "$dir"/{state,spool}
    start_munge "$dir"

    cat >"$dir/gres.conf" <<EOF
AutoDetect=off
NodeName=$host Name=gpu File=/dev/null
EOF
    cat >"$dir/slurm.conf" <<EOF
ClusterName=artefact-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=16818
$(common_slurm_conf "$dir")
SlurmdSpoolDir=$dir/spool
SlurmdPidFile=$dir/slurmd.pid
SlurmdLogFile=$dir/slurmd.log
GresTypes=gpu
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory_mb Gres=gpu:1 State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF=$dir/slurm.conf
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF"
    wait_idle "$dir" 1
}

stop() {
    local dir=$1 name pid
    # Jobs first: their steps outlive the daemons. Each job script stops its own Ray and MLflow.
    if [ -f "$dir/slurmctld.pid" ] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
        SLURM_CONF=$dir/slurm.conf scancel --quiet --user "$(id -un)" || true
        for _ in $(seq 1 60); do
            [ -z "$(SLURM_CONF=$dir/slurm.conf squeue --noheader 2>/dev/null)" ] && break
            sleep 1
        done
    fi
    for name in slurmd slurmctld munged; do
        if [ -f "$dir/$name.pid" ]; then
            pid=$(cat "$dir/$name.pid")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 1 50); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.1
            done
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
}

case $command in
start) start "${2:?start needs a folder}" ;;
stop) stop "${2:?stop needs a folder}" ;;
*)
    echo "slurm_cluster.sh: unknown command $command (start DIR, stop DIR)" >&2
    exit 2
    ;;
esac
