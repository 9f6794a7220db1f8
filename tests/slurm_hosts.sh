#!/usr/bin/env bash
# A real SLURM cluster of separate hosts for the multi-node tests: each node is a Linux network
# namespace with its own interface, address and hostname, joined to the others by a bridge;
# slurmctld and munged run outside them on the bridge's address, one slurmd in each. Needs root.
#
#   tests/slurm_hosts.sh start DIR NODES   write the config, create the hosts, start the daemons
#   tests/slurm_hosts.sh stop DIR          cancel the jobs, kill everything in the hosts, delete them
#   tests/slurm_hosts.sh run DIR NODE CMD  run CMD on host NODE (n1, n2, ...), as the node sees itself
#
# The hosts are named n1..nNODES, at 10.77.0.11, .12, ..., and "outsider" at 10.77.0.99, on the
# network but not in the cluster (the bridge, where slurmctld listens, is 10.77.0.1); clients
# use the cluster with SLURM_CONF=DIR/slurm.conf. Each host sees DIR/hosts-<host> as /etc/hosts,
# so `hostname --ip-address` answers the node's own address there.
set -euo pipefail
# shellcheck source=tests/slurm_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/slurm_common.sh"

command=${1:?usage: slurm_hosts.sh start DIR NODES | stop DIR | run DIR NODE CMD...}
NET=10.77.0
BRIDGE=artefactbr0
PREFIX=artefact-

namespace() { echo "$PREFIX$1"; }

add_host() {  # add_host DIR NAME ADDRESS NODES: a namespace on the bridge, and its /etc/hosts
    local dir=$1 name=$2 address=$3 nodes=$4 ns node
    ns=$(namespace "$name")
    ip netns add "$ns"
    ip link add "veth-$name" type veth peer name eth0 netns "$ns"
    ip link set "veth-$name" master "$BRIDGE" up
    ip -n "$ns" addr add "$address/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    {
        echo "$address $name"
        echo "127.0.0.1 localhost"
        for node in $(seq 1 "$nodes"); do
            [ "n$node" = "$name" ] || echo "$NET.$((10 + node)) n$node"
        done
    } >"$dir/hosts-$name"
}

start() {
    local dir=$1 nodes=$2 node cpus memory_mb
    mkdir -p "$dir/state"
    ip link add "$BRIDGE" type bridge
    ip addr add "$NET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    for node in $(seq 1 "$nodes"); do
        add_host "$dir" "n$node" "$NET.$((10 + node))" "$nodes"
        mkdir -p "$dir/spool-n$node"
    done
    add_host "$dir" outsider "$NET.99" "$nodes"  # a host on the network that is not in the cluster

    start_munge "$dir"

    cpus=$(($(getconf _NPROCESSORS_ONLN) / nodes))
    cpus=$((cpus > 0 ? cpus : 1))
    memory_mb=$((($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048) / nodes))
    cat >"$dir/slurm.conf" <<EOF
ClusterName=artefact-hosts
SlurmctldHost=$(hostname -s)($NET.1)
SlurmctldPort=16827
SlurmdPort=16828
$(common_slurm_conf "$dir")
SlurmdSpoolDir=$dir/spool-%n
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmdLogFile=$dir/slurmd-%n.log
SlurmdTimeout=30
$(for node in $(seq 1 "$nodes"); do
        echo "NodeName=n$node NodeAddr=$NET.$((10 + node)) CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN"
    done)
PartitionName=hosts Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    export SLURM_CONF=$dir/slurm.conf
    slurmctld -f "$SLURM_CONF"
    for node in $(seq 1 "$nodes"); do
        run "$dir" "n$node" slurmd -f "$SLURM_CONF" -N "n$node"
    done
    wait_idle "$dir" "$nodes"
}

run() {  # run DIR NODE CMD...: CMD in NODE's network namespace, with NODE as its hostname
    local dir=$1 node=$2
    shift 2
    # nsenter rather than `ip netns exec`, which mounts a fresh /sys without the cgroup file
    # systems slurmd needs; the node's own /etc/hosts is bound in a mount namespace of its own.
    # shellcheck disable=SC2016  # expanded by the inner shell
    nsenter --net="/run/netns/$(namespace "$node")" unshare --mount --uts \
        sh -c 'mount --bind "$1" /etc/hosts && hostname "$0" && shift && exec "$@"' \
        "$node" "$dir/hosts-$node" "$@"
}

stop() {
    local dir=$1 ns pid
    # The jobs, slurmctld and munged as the one-node cluster stops them (no slurmd.pid here),
    # then everything left in a host (its slurmd, a job's Ray and MLflow), then the hosts.
    "$(dirname "${BASH_SOURCE[0]}")/slurm_cluster.sh" stop "$dir"
    for ns in $(ip netns list | awk '{print $1}' | grep "^$PREFIX" || true); do
        for pid in $(ip netns pids "$ns"); do
            kill -9 "$pid" 2>/dev/null || true
        done
        ip netns delete "$ns"
    done
    ip link delete "$BRIDGE" 2>/dev/null || true
}

case $command in
start) start "${2:?start needs a folder}" "${3:?start needs a node count}" ;;
stop) stop "${2:?stop needs a folder}" ;;
run) run "${2:?run needs a folder}" "${3:?run needs a node}" "${@:4}" ;;
*)
    echo "slurm_hosts.sh: unknown command $command (start DIR NODES, stop DIR, run DIR NODE CMD)" >&2
    exit 2
    ;;
esac
