#!/usr/bin/env bash
# The Debian packages some tests drive for real: Chromium (browser tests), SLURM and munge
# (the SLURM tests' clusters), iproute2 and util-linux (the multi-node tests' hosts in network
# namespaces), shellcheck, and g++ (TorchInductor's CPU kernels, for the compile test). Run
# by `make system-deps` (and CI), never by `make test`: installed with apt-get (through sudo
# unless root) only when one is missing, so a second run costs nothing.
set -euo pipefail

missing=()
command -v chromium >/dev/null || [ -x /usr/lib/chromium/chromium ] || missing+=(chromium)
command -v shellcheck >/dev/null || missing+=(shellcheck)
command -v slurmctld >/dev/null || missing+=(slurmctld)
command -v slurmd >/dev/null || missing+=(slurmd)
command -v sbatch >/dev/null || missing+=(slurm-client)
command -v munged >/dev/null || missing+=(munge)
command -v g++ >/dev/null || missing+=(g++)
command -v ip >/dev/null || missing+=(iproute2)  # the multi-node tests' hosts: network namespaces
command -v nsenter >/dev/null || missing+=(util-linux)
[ ${#missing[@]} -eq 0 ] && exit 0

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}
echo "installing Debian packages for the tests: ${missing[*]}"
install=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}")
as_root "${install[@]}" || { as_root apt-get update -q && as_root "${install[@]}"; }
