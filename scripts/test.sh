#!/usr/bin/env bash
# The test suite, as the README gives it: starts a real Kafka broker (scripts/kafka.sh), a
# real dCache 12 publishing its billing messages to it (scripts/dcache.sh; built once into a
# cache, about 4 minutes), a real Rucio 41.5.1 (scripts/rucio.sh; installed once, about
# 50 s) and a real Slurm 22.05 (scripts/slurm.sh; Debian packages, about 25 s once), runs every
# test of the workspace against them, stops them.
# Arguments go to cargo test. DCFLOW_NO_DCACHE=1 leaves dCache out (its tests then say
# SKIPPED; under CI that is a failure).
set -euo pipefail
cd "$(dirname "$0")/.."
export KAFKA_STATE="${KAFKA_STATE:-/tmp/dcflow-kafka-test}"
trap 'scripts/slurm.sh stop >/dev/null 2>&1 || true; scripts/rucio.sh stop >/dev/null 2>&1 || true; scripts/dcache.sh stop >/dev/null 2>&1 || true; scripts/kafka.sh stop || true' EXIT
eval "$(scripts/kafka.sh start)"
echo "kafka broker: DCFLOW_KAFKA=$DCFLOW_KAFKA (state in $KAFKA_STATE)"
if [ -z "${DCFLOW_NO_DCACHE:-}" ]; then
  eval "$(KAFKA="$DCFLOW_KAFKA" scripts/dcache.sh start)"
  echo "dCache: door $DCFLOW_DCACHE_DOOR, frontend $DCFLOW_DCACHE_FRONTEND, billing to topic $DCFLOW_DCACHE_TOPIC"
fi
eval "$(scripts/rucio.sh start)"
echo "Rucio: $DCFLOW_RUCIO"
eval "$(scripts/slurm.sh start)"
echo "Slurm: SLURM_CONF=$SLURM_CONF"
cargo test --workspace --locked "$@"
