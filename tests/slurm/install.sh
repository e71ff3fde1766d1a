#!/bin/sh
# Debian's Slurm and munge for tests/slurm (a one-node cluster the test starts and stops itself).
# Installed only when missing, and only as root with apt-get; otherwise the test says why it skips.
set -u
PKGS="slurmctld slurmd munge slurm-client"
if command -v sbatch >/dev/null && [ -x /usr/sbin/slurmctld ] && [ -x /usr/sbin/slurmd ] && [ -x /usr/sbin/munged ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "Slurm is not installed and this is not root with apt-get: tests/slurm will be skipped"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends $PKGS >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $PKGS >/dev/null; } \
    || echo "apt-get could not install $PKGS: tests/slurm will be skipped"
exit 0
