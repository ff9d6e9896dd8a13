#!/usr/bin/env bash
# A real Apache Kafka broker for tests and benchmarks: single node, KRaft, on 127.0.0.1.
#
#   scripts/kafka.sh fetch     download Kafka from Maven Central into the cache (once)
#   scripts/kafka.sh start     format a fresh storage, start, wait until it answers;
#                              prints `export DCFLOW_KAFKA=127.0.0.1:<port>`
#   scripts/kafka.sh stop      stop it (SIGTERM, then SIGKILL after 30 s)
#   scripts/kafka.sh restart   stop and start again on the same port and data (outage tests)
#   scripts/kafka.sh delete-topic NAME   delete a topic (benchmarks clean up after themselves)
#
# Environment: KAFKA_VERSION (4.4.0), KAFKA_CACHE (~/.cache/dcflow/kafka-$KAFKA_VERSION),
# KAFKA_STATE (/tmp/dcflow-kafka: config, data, log, pid, port), KAFKA_PORT (a free port).
set -euo pipefail

KAFKA_VERSION="${KAFKA_VERSION:-4.4.0}"
LOG4J_VERSION="${LOG4J_VERSION:-2.26.1}"
SLF4J_VERSION="${SLF4J_VERSION:-2.0.17}"
KAFKA_CACHE="${KAFKA_CACHE:-$HOME/.cache/dcflow/kafka-$KAFKA_VERSION-2}"
KAFKA_STATE="${KAFKA_STATE:-/tmp/dcflow-kafka}"

die() { echo "kafka.sh: $*" >&2; exit 1; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

fetch() {
  if [ -f "$KAFKA_CACHE/.complete" ]; then return 0; fi
  command -v mvn >/dev/null || die "Maven (mvn) is needed to fetch Kafka"
  command -v java >/dev/null || die "Java is needed to run Kafka"
  mkdir -p "$KAFKA_CACHE"
  cat > "$KAFKA_CACHE/pom.xml" <<POM
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dcflow</groupId><artifactId>kafka-broker</artifactId><version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$KAFKA_VERSION</version></dependency>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-tools</artifactId><version>$KAFKA_VERSION</version></dependency>
    <!-- Kafka logs through SLF4J 2; a dependency pulls in the 1.7 API, which would not bind. -->
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId><version>$SLF4J_VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId><version>$LOG4J_VERSION</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>$LOG4J_VERSION</version></dependency>
  </dependencies>
</project>
POM
  (cd "$KAFKA_CACHE" && mvn -q -B -Dstyle.color=never dependency:copy-dependencies -DoutputDirectory=libs -DincludeScope=runtime >&2) \
    || die "fetching Kafka $KAFKA_VERSION from Maven Central failed"
  cat > "$KAFKA_CACHE/log4j2.yaml" <<'LOG'
Configuration:
  Appenders:
    Console:
      name: STDOUT
      PatternLayout:
        pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Root:
      level: INFO
      AppenderRef:
        - ref: STDOUT
    Logger:
      - name: kafka.request.logger
        level: WARN
      - name: org.apache.kafka.controller
        level: WARN
LOG
  touch "$KAFKA_CACHE/.complete"
}

java_cmd() {
  java -Xms256m -Xmx768m -XX:+UseG1GC -Dlog4j2.configurationFile="$KAFKA_CACHE/log4j2.yaml" \
    -cp "$KAFKA_CACHE/libs/*" "$@"
}

running() {
  [ -f "$KAFKA_STATE/pid" ] && kill -0 "$(cat "$KAFKA_STATE/pid")" 2>/dev/null
}

wait_ready() {
  local port=$1
  for _ in $(seq 1 120); do
    if grep -q "Kafka Server started" "$KAFKA_STATE/server.log" 2>/dev/null \
       && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      return 0
    fi
    running || die "the broker exited; see $KAFKA_STATE/server.log"
    sleep 0.5
  done
  die "the broker did not start within 60 s; see $KAFKA_STATE/server.log"
}

launch() {
  local port; port=$(cat "$KAFKA_STATE/port")
  nohup bash -c "$(declare -f java_cmd); KAFKA_CACHE='$KAFKA_CACHE'; java_cmd kafka.Kafka '$KAFKA_STATE/server.properties'" \
    >> "$KAFKA_STATE/server.log" 2>&1 &
  echo $! > "$KAFKA_STATE/pid"
  wait_ready "$port"
}

start() {
  fetch
  running && die "already running (pid $(cat "$KAFKA_STATE/pid")); stop it first"
  rm -rf "$KAFKA_STATE"
  mkdir -p "$KAFKA_STATE/data"
  local port="${KAFKA_PORT:-$(free_port)}" cport; cport=$(free_port)
  echo "$port" > "$KAFKA_STATE/port"
  cat > "$KAFKA_STATE/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$KAFKA_STATE/data
num.partitions=1
auto.create.topics.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
group.initial.rebalance.delay.ms=0
log.flush.interval.messages=10000
PROPS
  local id; id=$(java_cmd kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1)
  java_cmd kafka.tools.StorageTool format -t "$id" -c "$KAFKA_STATE/server.properties" \
    > "$KAFKA_STATE/format.log" 2>&1 || die "formatting failed; see $KAFKA_STATE/format.log"
  launch
  echo "export DCFLOW_KAFKA=127.0.0.1:$port"
}

stop() {
  running || { rm -f "$KAFKA_STATE/pid"; return 0; }
  local pid; pid=$(cat "$KAFKA_STATE/pid")
  pkill -TERM -P "$pid" 2>/dev/null || true
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 60); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$KAFKA_STATE/pid"; return 0; }
    sleep 0.5
  done
  pkill -KILL -P "$pid" 2>/dev/null || true
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$KAFKA_STATE/pid"
}

restart() {
  [ -f "$KAFKA_STATE/port" ] || die "never started"
  stop
  launch
  echo "export DCFLOW_KAFKA=127.0.0.1:$(cat "$KAFKA_STATE/port")"
}

delete_topic() {
  [ -n "${1:-}" ] || die "delete-topic needs a topic name"
  running || die "not running"
  java_cmd org.apache.kafka.tools.TopicCommand --bootstrap-server "127.0.0.1:$(cat "$KAFKA_STATE/port")" \
    --delete --topic "$1" >/dev/null
}

case "${1:-}" in
  fetch) fetch ;;
  start) start ;;
  stop) stop ;;
  restart) restart ;;
  delete-topic) delete_topic "${2:-}" ;;
  *) die "usage: scripts/kafka.sh fetch|start|stop|restart|delete-topic NAME" ;;
esac
