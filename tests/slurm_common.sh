#!/usr/bin/env bash
# What the test clusters share (sourced by tests/slurm_cluster.sh and tests/slurm_hosts.sh):
# munged with a fresh key, and the slurm.conf lines that do not depend on the nodes. Every
# key, socket, state and pid file lives under the cluster's folder.

start_munge() {  # start_munge DIR
    local dir=$1
    mkdir -p "$dir/munge"
    chmod 0755 "$dir/munge"  # munged refuses a socket folder others cannot enter
    mungekey --create --keyfile="$dir/munge.key" --force
    chmod 0400 "$dir/munge.key"
    munged --socket="$dir/munge/munge.socket.2" --key-file="$dir/munge.key" --pid-file="$dir/munged.pid" \
        --log-file="$dir/munged.log" --seed-file="$dir/munged.seed" --force
}

common_slurm_conf() {  # common_slurm_conf DIR: root runs the jobs, no cgroups, requeue allowed
    local dir=$1
    cat <<EOC
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket.2
StateSaveLocation=$dir/state
SlurmctldPidFile=$dir/slurmctld.pid
SlurmctldLogFile=$dir/slurmctld.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
JobRequeue=1
ReturnToService=2
MinJobAge=600
EOC
}

wait_idle() {  # wait_idle DIR NODES: until NODES nodes of DIR's cluster are idle, else fail
    local dir=$1 nodes=$2
    for _ in $(seq 1 60); do
        [ "$(SLURM_CONF=$dir/slurm.conf sinfo --noheader --Node --format=%t 2>/dev/null | grep -c idle)" -ge "$nodes" ] \
            && return
        sleep 0.5
    done
    echo "$(basename "$0"): $nodes node(s) did not become idle; see $dir/slurmctld.log and $dir/slurmd*.log" >&2
    exit 1
}
