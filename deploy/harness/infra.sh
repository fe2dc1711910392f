#!/usr/bin/env bash
# Local server harness: Apache Kafka (KRaft, single node) + Apache Cassandra 5.0,
# fetched from Maven Central with Maven, run as plain JVMs on 127.0.0.1.
# No Docker needed. See README.md next to this file.
#
#   infra.sh fetch    download server jars into $CDP_INFRA_CACHE (once)
#   infra.sh up       fetch if needed, start both, wait until ready (idempotent)
#   infra.sh down     stop both, delete their data (succeeds if not running)
#   infra.sh status   show state; exit 0 only if both are running and ready
#   infra.sh smoke    create a Kafka topic + run a CQL round trip (needs `up`)
#   infra.sh stop S   stop one server (kafka|cassandra), keeping its data
#   infra.sh start S  start one stopped server again on its data
#   infra.sh flush    write Cassandra's memtables to SSTables (nodetool flush)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${CDP_INFRA_CACHE:-$HOME/.cache/cdp-infra}"
RUN="${CDP_INFRA_RUN:-$CACHE/run}"
TIMEOUT="${CDP_INFRA_TIMEOUT:-180}"            # seconds to wait for readiness
STOP_TIMEOUT="${CDP_INFRA_STOP_TIMEOUT:-30}"   # seconds between SIGTERM and SIGKILL
KAFKA_HEAP="${CDP_KAFKA_HEAP:-512m}"
# Every end-to-end test on Cassandra creates a keyspace (and a rebuild one
# more); their schema stays on the heap until the servers stop. 768m ran out
# after a few hundred keyspaces (a long-lived `make infra-up` serving several
# test runs); one `make test` creates several dozen.
CASSANDRA_HEAP="${CDP_CASSANDRA_HEAP:-1536m}"
# extra arguments for mvn, e.g. "-o" (offline) or "-Dmaven.repo.local=/x"
read -r -a MVN_EXTRA <<<"${CDP_INFRA_MAVEN_ARGS:-}"

HOST=127.0.0.1
KAFKA_PORT=9092
KAFKA_CONTROLLER_PORT=9093
CQL_PORT=9042
CASSANDRA_STORAGE_PORT=7000
# JMX on the loopback interface only, for nodetool (`infra.sh flush`).
CASSANDRA_JMX_PORT="${CDP_CASSANDRA_JMX_PORT:-7199}"

SERVERS=(kafka cassandra)

log() { printf '[infra] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

now_ms() { date +%s%3N; }
secs_since() { # $1 = start in ms -> "12.3"
  local d=$(($(now_ms) - $1))
  printf '%d.%d' $((d / 1000)) $((d % 1000 / 100))
}

need() { command -v "$1" >/dev/null 2>&1 || die "'$1' not found on PATH"; }

lib_dir() { echo "$CACHE/$1/lib"; }
run_dir() { echo "$RUN/$1"; }
pid_file() { echo "$RUN/$1/server.pid"; }
log_file() { # the log that carries the readiness line
  case "$1" in
    kafka) echo "$RUN/kafka/server.log" ;;
    cassandra) echo "$RUN/cassandra/system.log" ;;
  esac
}
main_class() {
  case "$1" in
    kafka) echo "kafka.Kafka" ;;
    cassandra) echo "org.apache.cassandra.service.CassandraDaemon" ;;
  esac
}
port_of() {
  case "$1" in
    kafka) echo "$KAFKA_PORT" ;;
    cassandra) echo "$CQL_PORT" ;;
  esac
}
ports_of() { # every port the server binds
  case "$1" in
    kafka) echo "$KAFKA_PORT $KAFKA_CONTROLLER_PORT" ;;
    cassandra) echo "$CQL_PORT $CASSANDRA_STORAGE_PORT" ;;
  esac
}
ready_line() {
  case "$1" in
    kafka) echo "Kafka Server started" ;;
    cassandra) echo "Startup complete" ;;
  esac
}

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

# Prints the pid if the server is running (pid file present, process alive and
# really our JVM -- guards against pid reuse), otherwise prints nothing.
running_pid() {
  local f pid
  f="$(pid_file "$1")"
  [[ -f "$f" ]] || return 0
  pid="$(cat "$f" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 0
  if kill -0 "$pid" 2>/dev/null &&
    ps -o args= -p "$pid" 2>/dev/null | grep -qF "$(main_class "$1")"; then
    echo "$pid"
  fi
}

is_ready() { # running, readiness line logged, client port accepting
  [[ -n "$(running_pid "$1")" ]] &&
    grep -qF "$(ready_line "$1")" "$(log_file "$1")" 2>/dev/null &&
    port_open "$(port_of "$1")"
}

# ---------------------------------------------------------------- fetch ----

fetch_one() {
  local s="$1" pom lib marker sum tmp t0
  pom="$HERE/$s/pom.xml"
  lib="$(lib_dir "$s")"
  marker="$CACHE/$s/.fetched"
  [[ -f "$pom" ]] || die "missing $pom"
  sum="$(sha256sum "$pom" | cut -d' ' -f1)"
  if [[ -f "$marker" && "$(cat "$marker")" == "$sum" && -d "$lib" ]]; then
    log "$s: jars already cached in $lib"
    return 0
  fi
  need mvn
  mkdir -p "$CACHE/$s"
  tmp="$CACHE/$s/lib.tmp.$$"
  rm -rf "$tmp"
  log "$s: fetching jars with Maven into $lib ..."
  t0=$(now_ms)
  # -q still leaves ANSI resets on stdout, and errors go to stdout: keep a log
  if ! mvn -q -B -Dstyle.color=never "${MVN_EXTRA[@]}" -f "$pom" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$tmp" >"$CACHE/$s/fetch.log" 2>&1; then
    tail -n 40 "$CACHE/$s/fetch.log" >&2
    rm -rf "$tmp"
    die "$s: mvn dependency:copy-dependencies failed (log: $CACHE/$s/fetch.log)"
  fi
  rm -rf "$lib"
  mv "$tmp" "$lib"
  echo "$sum" >"$marker"
  log "$s: fetched $(find "$lib" -name '*.jar' | wc -l) jars ($(du -sh "$lib" | cut -f1)) in $(secs_since "$t0")s"
}

cmd_fetch() {
  local s
  for s in "${SERVERS[@]}"; do fetch_one "$s"; done
}

# ---------------------------------------------------------------- kafka ----

start_kafka() {
  local d lib cid
  d="$(run_dir kafka)"
  lib="$(lib_dir kafka)"
  mkdir -p "$d/data"
  cat >"$d/server.properties" <<EOF
# generated by deploy/harness/infra.sh -- edits are overwritten on 'up'
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$KAFKA_CONTROLLER_PORT
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://$HOST:$KAFKA_PORT,CONTROLLER://$HOST:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://$HOST:$KAFKA_PORT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$d/data
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
num.partitions=4
auto.create.topics.enable=false
num.network.threads=2
num.io.threads=2
num.recovery.threads.per.data.dir=1
EOF
  if [[ ! -f "$d/data/meta.properties" ]]; then
    # same shape as 'StorageTool random-uuid' (base64url of 16 random bytes, not
    # starting with '-'), without paying for another JVM start
    cid="-"
    while [[ "$cid" == -* ]]; do
      cid="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
    done
    echo "$cid" >"$d/cluster.id"
    java -cp "$lib/*" kafka.tools.StorageTool format -t "$cid" \
      -c "$d/server.properties" >"$d/format.log" 2>&1 ||
      { cat "$d/format.log" >&2; die "kafka: storage format failed"; }
  fi
  [[ -f "$d/server.log" ]] && mv -f "$d/server.log" "$d/server.log.prev"
  # slf4j-simple writes to stderr; both streams go to server.log
  nohup java -Xms256m -Xmx"$KAFKA_HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -Djava.awt.headless=true \
    -Dorg.slf4j.simpleLogger.showDateTime=true \
    -Dorg.slf4j.simpleLogger.dateTimeFormat="yyyy-MM-dd'T'HH:mm:ss.SSS" \
    -cp "$lib/*" kafka.Kafka "$d/server.properties" \
    >"$d/server.log" 2>&1 </dev/null &
  echo $! >"$(pid_file kafka)"
}

kafka_topics() { # TopicCommand with the cached classpath; stderr (logging) dropped
  java -cp "$(lib_dir kafka)/*" org.apache.kafka.tools.TopicCommand \
    --bootstrap-server "$HOST:$KAFKA_PORT" "$@" 2>/dev/null
}

# ------------------------------------------------------------ cassandra ----

# JPMS flags from Cassandra 5.0's conf/jvm17-server.options
CASSANDRA_JVM17_OPTS=(
  -Djdk.attach.allowAttachSelf=true
  --add-exports java.base/jdk.internal.misc=ALL-UNNAMED
  --add-exports java.management.rmi/com.sun.jmx.remote.internal.rmi=ALL-UNNAMED
  --add-exports java.rmi/sun.rmi.registry=ALL-UNNAMED
  --add-exports java.rmi/sun.rmi.server=ALL-UNNAMED
  --add-exports java.sql/java.sql=ALL-UNNAMED
  --add-exports java.base/java.lang.ref=ALL-UNNAMED
  --add-exports jdk.unsupported/sun.misc=ALL-UNNAMED
  --add-exports jdk.compiler/com.sun.tools.javac.file=ALL-UNNAMED
  --add-exports jdk.attach/sun.tools.attach=ALL-UNNAMED
  --add-opens java.base/java.lang.module=ALL-UNNAMED
  --add-opens java.base/jdk.internal.loader=ALL-UNNAMED
  --add-opens java.base/jdk.internal.ref=ALL-UNNAMED
  --add-opens java.base/jdk.internal.reflect=ALL-UNNAMED
  --add-opens java.base/jdk.internal.math=ALL-UNNAMED
  --add-opens java.base/jdk.internal.module=ALL-UNNAMED
  --add-opens java.base/jdk.internal.util.jar=ALL-UNNAMED
  --add-opens jdk.management/com.sun.management.internal=ALL-UNNAMED
  --add-opens java.base/sun.nio.ch=ALL-UNNAMED
  --add-opens java.base/java.io=ALL-UNNAMED
  --add-opens java.base/java.lang.reflect=ALL-UNNAMED
  --add-opens jdk.compiler/com.sun.tools.javac=ALL-UNNAMED
  --add-opens java.base/java.lang=ALL-UNNAMED
  --add-opens java.base/java.util=ALL-UNNAMED
  -Dio.netty.tryReflectionSetAccessible=true
  -Dio.netty.allocator.useCacheForAllThreads=true
  -Dio.netty.allocator.maxOrder=11
)

start_cassandra() {
  local d lib data jamm
  d="$(run_dir cassandra)"
  lib="$(lib_dir cassandra)"
  data="$d/data"
  mkdir -p "$data" "$d/conf" "$d/tmp"
  jamm="$(find "$lib" -maxdepth 1 -name 'jamm-*.jar' | head -n1)"
  [[ -n "$jamm" ]] || die "cassandra: no jamm-*.jar in $lib (re-run fetch)"

  # Minimal single-node config. No allocate_tokens_for_local_replication_factor:
  # with it, token allocation waits RING_DELAY (30 s) for schema from peers.
  cat >"$d/conf/cassandra.yaml" <<EOF
# generated by deploy/harness/infra.sh -- edits are overwritten on 'up'
cluster_name: cdp-dev
num_tokens: 1
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
endpoint_snitch: SimpleSnitch
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "$HOST:$CASSANDRA_STORAGE_PORT"
listen_address: $HOST
rpc_address: $HOST
storage_port: $CASSANDRA_STORAGE_PORT
native_transport_port: $CQL_PORT
start_native_transport: true
data_file_directories:
  - $data/data
commitlog_directory: $data/commitlog
hints_directory: $data/hints
saved_caches_directory: $data/saved_caches
cdc_raw_directory: $data/cdc_raw
commitlog_sync: periodic
commitlog_sync_period: 10000ms
auto_snapshot: false
concurrent_reads: 4
concurrent_writes: 4
concurrent_counter_writes: 4
concurrent_materialized_view_writes: 4
concurrent_compactors: 1
EOF
  cat >"$d/conf/logback.xml" <<EOF
<configuration scan="false">
  <appender name="FILE" class="ch.qos.logback.core.FileAppender">
    <file>$d/system.log</file>
    <append>false</append>
    <encoder><pattern>%-5level [%thread] %date{ISO8601} %F:%L - %msg%n</pattern></encoder>
  </appender>
  <root level="INFO"><appender-ref ref="FILE"/></root>
</configuration>
EOF
  [[ -f "$d/system.log" ]] && mv -f "$d/system.log" "$d/system.log.prev"
  # cassandra.jmx.local.port: a JMX server bound to the loopback interface
  # only, for nodetool.
  nohup java -Xms"$CASSANDRA_HEAP" -Xmx"$CASSANDRA_HEAP" -Xss256k \
    -XX:+UseG1GC -XX:+ParallelRefProcEnabled -XX:MaxTenuringThreshold=1 \
    -XX:G1HeapRegionSize=16m -XX:MaxGCPauseMillis=300 \
    -XX:+ExitOnOutOfMemoryError \
    "${CASSANDRA_JVM17_OPTS[@]}" \
    -javaagent:"$jamm" \
    -Dcassandra.config="file://$d/conf/cassandra.yaml" \
    -Dcassandra.jmx.local.port="$CASSANDRA_JMX_PORT" \
    -Dcassandra.storagedir="$data" \
    -Dcassandra.logdir="$d" \
    -Dcassandra-foreground=yes \
    -Dlogback.configurationFile="$d/conf/logback.xml" \
    -Dcassandra.skip_wait_for_gossip_to_settle=0 \
    -Djna.tmpdir="$d/tmp" \
    -Djava.io.tmpdir="$d/tmp" \
    -cp "$lib/*" org.apache.cassandra.service.CassandraDaemon \
    >"$d/stdout.log" 2>&1 </dev/null &
  echo $! >"$(pid_file cassandra)"
}

# ------------------------------------------------------------- commands ----

show_tail() { # $1 server
  local f
  f="$(log_file "$1")"
  log "----- last 40 lines of $f -----"
  tail -n 40 "$f" >&2 2>/dev/null || true
  if [[ "$1" == cassandra && -s "$(run_dir cassandra)/stdout.log" ]]; then
    log "----- last 20 lines of $(run_dir cassandra)/stdout.log -----"
    tail -n 20 "$(run_dir cassandra)/stdout.log" >&2 || true
  fi
}

cmd_up() {
  need java
  cmd_fetch
  local s p
  local -A started_at=() pending=()
  # refuse to start anything if a port we need is taken by someone else
  for s in "${SERVERS[@]}"; do
    [[ -n "$(running_pid "$s")" ]] && continue
    for p in $(ports_of "$s"); do
      port_open "$p" && die "$s: port $HOST:$p is already in use by another process"
    done
  done
  for s in "${SERVERS[@]}"; do
    mkdir -p "$(run_dir "$s")"
    if [[ -n "$(running_pid "$s")" ]]; then
      log "$s: already running (pid $(running_pid "$s"))"
    else
      log "$s: starting (logs: $(log_file "$s"))"
      started_at[$s]=$(now_ms)
      "start_$s"
    fi
    pending[$s]=1
  done

  local deadline=$(($(date +%s) + TIMEOUT)) failed=0
  while ((${#pending[@]} > 0)); do
    for s in "${!pending[@]}"; do
      if [[ -z "$(running_pid "$s")" ]]; then
        log "$s: process exited during startup"
        show_tail "$s"
        unset "pending[$s]"
        failed=1
      elif is_ready "$s"; then
        if [[ "$s" == kafka ]] && ! kafka_topics --list >/dev/null; then
          continue # broker says started but admin API not answering yet
        fi
        if [[ -n "${started_at[$s]:-}" ]]; then
          log "$s: ready on $HOST:$(port_of "$s") after $(secs_since "${started_at[$s]}")s"
        else
          log "$s: ready on $HOST:$(port_of "$s")"
        fi
        unset "pending[$s]"
      fi
    done
    ((${#pending[@]} == 0)) && break
    if (($(date +%s) >= deadline)); then
      for s in "${!pending[@]}"; do
        log "$s: not ready after ${TIMEOUT}s (still running; 'infra.sh down' to stop)"
        show_tail "$s"
      done
      exit 1
    fi
    sleep 1
  done
  ((failed == 0)) || exit 1
}

stop_one() {
  local s="$1" pid i
  pid="$(running_pid "$s")"
  if [[ -z "$pid" ]]; then
    log "$s: not running"
    return 0
  fi
  log "$s: stopping pid $pid (SIGTERM)"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < STOP_TIMEOUT * 2; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "$s: still alive after ${STOP_TIMEOUT}s, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 20; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.25
    done
  fi
  log "$s: stopped"
}

cmd_down() {
  local s
  local -a waits=()
  # stop in parallel; each stop_one is bounded by STOP_TIMEOUT (+5 s after SIGKILL)
  for s in "${SERVERS[@]}"; do
    stop_one "$s" &
    waits+=($!)
  done
  for p in "${waits[@]}"; do wait "$p" || true; done
  for s in "${SERVERS[@]}"; do
    [[ -n "$(running_pid "$s")" ]] && die "$s: could not be stopped"
    # drop data/config/pid so the next 'up' starts clean; keep logs for post-mortems
    local d
    d="$(run_dir "$s")"
    rm -rf "$d/data" "$d/conf" "$d/tmp" "$d/server.pid" "$d/server.properties" \
      "$d/cluster.id" "$d/format.log" "$d/smoke"
  done
  log "run data removed from $RUN (logs kept)"
}

cmd_status() {
  local s pid ok=0
  for s in "${SERVERS[@]}"; do
    pid="$(running_pid "$s")"
    if [[ -z "$pid" ]]; then
      printf '%-10s stopped\n' "$s"
      ok=1
    elif is_ready "$s"; then
      printf '%-10s running  pid=%-8s %s:%s ready   log=%s\n' "$s" "$pid" "$HOST" "$(port_of "$s")" "$(log_file "$s")"
    else
      printf '%-10s running  pid=%-8s %s:%s STARTING log=%s\n' "$s" "$pid" "$HOST" "$(port_of "$s")" "$(log_file "$s")"
      ok=1
    fi
  done
  printf 'cache: %s\nrun:   %s\n' "$CACHE" "$RUN"
  return "$ok"
}

cmd_smoke() {
  need java
  for s in "${SERVERS[@]}"; do is_ready "$s" || die "$s is not ready; run 'infra.sh up'"; done
  local topic="cdp-smoke-$$" d
  kafka_topics --create --topic "$topic" --partitions 1 --replication-factor 1 >/dev/null ||
    die "kafka: topic create failed"
  kafka_topics --list | grep -qx "$topic" || die "kafka: created topic not listed"
  kafka_topics --delete --topic "$topic" >/dev/null || true
  log "kafka: created, listed and deleted topic $topic"

  # CQL round trip through the DataStax driver that ships in cassandra-all's deps
  d="$(run_dir cassandra)/smoke"
  mkdir -p "$d"
  cat >"$d/CqlSmoke.java" <<'EOF'
import com.datastax.driver.core.*;
public class CqlSmoke {
  public static void main(String[] a) {
    try (Cluster c = Cluster.builder().addContactPoint("127.0.0.1").withPort(9042)
           .withoutJMXReporting().build();
         Session s = c.connect()) {
      String v = s.execute("SELECT release_version FROM system.local").one().getString(0);
      s.execute("CREATE KEYSPACE IF NOT EXISTS cdp_smoke WITH replication = "
          + "{'class':'SimpleStrategy','replication_factor':1}");
      s.execute("CREATE TABLE IF NOT EXISTS cdp_smoke.t (k int PRIMARY KEY, v text)");
      s.execute("INSERT INTO cdp_smoke.t (k, v) VALUES (1, 'ok')");
      String r = s.execute("SELECT v FROM cdp_smoke.t WHERE k = 1").one().getString(0);
      s.execute("DROP KEYSPACE cdp_smoke");
      System.out.println("release_version=" + v + " roundtrip=" + r);
    }
  }
}
EOF
  # logback's default config would log the driver at DEBUG to stdout
  echo '<configuration><root level="WARN"/></configuration>' >"$d/logback.xml"
  local out
  out="$(java -Dlogback.configurationFile="$d/logback.xml" -cp "$(lib_dir cassandra)/*" \
    "$d/CqlSmoke.java" 2>"$d/smoke.err")" ||
    { tail -n 20 "$d/smoke.err" >&2; die "cassandra: CQL smoke test failed"; }
  log "cassandra: CQL ok ($out)"
}

cmd_flush() {
  need java
  [[ -f "$(pid_file cassandra)" ]] || die "cassandra is not running (infra.sh up)"
  local quiet
  quiet="$(run_dir cassandra)/conf/logback-tools.xml"
  cat >"$quiet" <<EOF
<configuration scan="false">
  <appender name="ERR" class="ch.qos.logback.core.ConsoleAppender">
    <target>System.err</target>
    <encoder><pattern>%-5level %msg%n</pattern></encoder>
  </appender>
  <root level="WARN"><appender-ref ref="ERR"/></root>
</configuration>
EOF
  java "${CASSANDRA_JVM17_OPTS[@]}" -Dlogback.configurationFile="$quiet" \
    -cp "$(lib_dir cassandra)/*" org.apache.cassandra.tools.NodeTool \
    -h "$HOST" -p "$CASSANDRA_JMX_PORT" flush "$@"
}

usage() {
  sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

one_server() { # validates $1 as a server name
  case "${1:-}" in
    kafka | cassandra) ;;
    *) die "name a server: kafka or cassandra" ;;
  esac
}

case "${1:-}" in
  stop)
    one_server "${2:-}"
    stop_one "$2"
    ;;
  start)
    one_server "${2:-}"
    SERVERS=("$2")
    cmd_up
    ;;
  fetch) cmd_fetch ;;
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  smoke) cmd_smoke ;;
  flush)
    shift
    cmd_flush "$@"
    ;;
  -h | --help | help) usage ;;
  *)
    usage >&2
    exit 2
    ;;
esac
