#!/usr/bin/env bash
# A real single-node Slurm 22.05 for the tests (Debian's slurmctld, slurmd, slurm-client,
# MUNGE, and slurmdbd on a private MariaDB so that `sacct` works), all state under SLURM_BASE
# (default /var/tmp/dcflow-slurm), nothing written to /etc. The scripts in scripts/slurm/ come
# from the shared Slurm kit (see its README for what was measured and why each setting).
#   scripts/slurm.sh build   apt-installs what is missing (~25 s once), lays out SLURM_BASE
#   scripts/slurm.sh start   starts the daemons (~2 s); prints `export SLURM_CONF=...` lines
#   scripts/slurm.sh stop    cancels the jobs, stops the daemons
#   scripts/slurm.sh env     the export lines
# Needs root (slurmd starts jobs as their user).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
export SLURM_BASE=${SLURM_BASE:-/var/tmp/dcflow-slurm}
conf=$SLURM_BASE/etc/slurm.conf

env_lines() {
  echo "export SLURM_CONF=$conf"
  echo "export DCFLOW_SLURM_BASE=$SLURM_BASE"
}

case "${1:-}" in
  build) "$here/slurm/setup.sh" >&2 ;;
  start)
    [ -f "$conf" ] || "$here/slurm/setup.sh" >&2
    "$here/slurm/start.sh" >&2
    mkdir -p "$SLURM_BASE/jobs" && chmod 1777 "$SLURM_BASE/jobs"
    env_lines
    ;;
  stop) "$here/slurm/stop.sh" >&2 ;;
  env) env_lines ;;
  *) echo "usage: scripts/slurm.sh build|start|stop|env" >&2; exit 2 ;;
esac
