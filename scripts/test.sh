#!/usr/bin/env bash
# The test suite, as the README gives it: starts a real Kafka broker (scripts/kafka.sh),
# runs every test of the workspace against it, stops the broker. Arguments go to cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."
export KAFKA_STATE="${KAFKA_STATE:-/tmp/dcflow-kafka-test}"
trap 'scripts/kafka.sh stop || true' EXIT
eval "$(scripts/kafka.sh start)"
echo "kafka broker: DCFLOW_KAFKA=$DCFLOW_KAFKA (state in $KAFKA_STATE)"
cargo test --workspace --locked "$@"
