#!/usr/bin/env bash
# bench/consume.sh — messages per second through `idem consume` next to the broker client's
# own consume-and-ack loop, in the same run, for NATS JetStream, RabbitMQ, Kafka and SQS.
#
# A benchmark, not a test: it prints numbers and never fails on them. It exits 1 when it
# could not measure (a process died, a broker is unreachable, a setup check failed) and 3
# when a run did the wrong thing — the endpoint did not receive exactly one call per
# message, idem decided anything but `delivered`, or a message was left unacknowledged in the
# broker — because then the numbers mean nothing.
#
# What runs, all on 127.0.0.1, in a temporary directory that is removed on exit with every
# process, stream and queue this script created (the directory is kept, logs and all, when
# the run fails):
#   endpoint   nginx, 1 worker, answers every request `201 {"id":"x"}` without touching the
#              disk (bench/nginx/upstream.conf.in, plus a stub_status location this script
#              adds to count the calls it really received)
#   brokers    the NATS JetStream server at NATS_URL and the RabbitMQ server at RABBITMQ_URL,
#              as they are (this script does not start them); for kafka and sqs, a private
#              tansu broker (memory storage) and a private moto SQS server that this script
#              starts from scripts/install-broker-tools' venv (or KAFKA_BROKERS / SQS_URL to
#              use running ones)
#   messages   MESSAGES small JSON objects (~110 B, a unique "id", e.g.
#              {"id":"m-00000001","order_id":"o-00000001","customer":"cus_1",...}),
#              published by examples/bare_consumer.rs into a FRESH stream (subjects
#              `STREAM.>`, file storage) or a FRESH durable queue (persistent messages,
#              publisher confirms) before every measurement, and deleted after it
#
# Scenarios (per broker):
#   bare-ack      examples/bare_consumer.rs: the broker client (async-nats durable pull
#                 consumer with explicit acks / lapin with basic.qos prefetch and manual acks /
#                 an rdkafka consumer group committing each offset after its message / the
#                 AWS SDK receiving ten at a time with long polling and deleting each),
#                 CONCURRENCY messages in flight, each only acked: the broker's ceiling
#   bare-http     the same, each message POSTed to the endpoint (reqwest, one keep-alive pool,
#                 `Idempotency-Key: {id}`), the answer read to its end, then acked
#                 (Kafka: committed; SQS: deleted)
#   idem          `idem consume` on a fresh SQLite store (`synchronous=full`, the default):
#                 message_id = { body = "/id" }, [deliver] POST to the endpoint,
#                 concurrency = CONCURRENCY                              (goal >= 0.8x bare-http)
#   idem-normal   the same on SQLite `synchronous=normal`
#   idem-memory   the same on `memory://` (tests only: no durability; shows the store's share)
#
# The clock: every row reports the STEADY-STATE rate, from the first message settled to the
# last, so that connecting, creating the durable consumer, opening the store and process
# start-up are left out alike: the bare client timestamps its own settlements
# ((MESSAGES - 1) / seconds); `idem consume` is watched through its [admin] /metrics
# (`idem_messages_total{subscriber="bench",decision=...}`) every WATCH_INTERVAL_MS by
# `bare_consumer watch`, from the first poll that sees any message settled to the first poll
# that sees all of them ((MESSAGES - seen at the first poll) / seconds; one polling interval
# of error at most). The "wall" column is process start to the last settlement (bare: to
# process exit), start-up included. The "cpu us/msg" column is the consumer process's own
# user + system CPU time (/proc; idem's is read when the watch sees the last message, and
# split by thread in the log and the JSON: tokio workers, the SQLite writer, the rest —
# mostly the main thread, which runs idem's dispatch loop) over MESSAGES; the brokers' and
# nginx's CPU is not in it.
#
# Every run is cross-checked: the endpoint's own request counter (nginx stub_status) must
# have received exactly MESSAGES POSTs (0 for bare-ack); idem's metrics must say
# delivered = MESSAGES and nothing else; after idem stops (SIGTERM, exit status 0), the
# broker must hold nothing unacknowledged (NATS: num_pending = num_ack_pending = 0,
# ack floor = MESSAGES; RabbitMQ: 0 messages ready; Kafka: the group's committed offset is
# MESSAGES; SQS: nothing visible nor in flight).
#
# moto is a Python server and tansu keeps its log in memory: their own ceilings are far
# below a production SQS or Kafka, so compare the rows of one broker with each other only.
#
# Each round runs every scenario once, in turn, so background noise spreads over all rows
# alike; a row reports the median over RUNS rounds.
#
# THE MACHINE MATTERS. On the reference machine (2 cores) the brokers, nginx and the
# consumer under test share the cores, so a ratio is a comparison between rows of the same
# run. The SQLite files live in the temporary directory: its filesystem decides what an
# fsync costs (printed; tmpfs makes `full` free).
#
# Default run time on the reference machine: about 3 minutes, plus the build.
#
# Usage:
#   bench/consume.sh                                      # defaults
#   BROKERS=nats RUNS=1 MESSAGES=20000 bench/consume.sh  # a quick look
#   SCENARIOS="bare-http idem" bench/consume.sh              # only the headline ratio
#   BROKERS=sqs MESSAGES=2000 RUNS=1 bench/consume.sh       # SQS on a private moto server
#   PERF=1 bench/consume.sh     # also profile the last `idem` (SQLite) row of each broker
#
# Environment:
#   MESSAGES=50000          messages per measurement
#   CONCURRENCY=64          messages in flight (idem's `concurrency`; the bare client's tasks,
#                           NATS pull batch and RabbitMQ prefetch, as idem sets them)
#   RUNS=3                  rounds
#   BROKERS="nats rabbitmq kafka" which brokers, in this order; add sqs (moto's server
#                           takes ~100 messages/s, so give it MESSAGES=2000 or so on its own)
#   KAFKA_BROKERS=host:port a running Kafka broker instead of a private tansu
#   SQS_URL=http://…        a running SQS server instead of a private moto (credentials from
#                           the environment; test/test when none are set)
#   SCENARIOS="bare-ack bare-http idem idem-normal idem-memory"
#   NATS_URL=nats://127.0.0.1:4222
#   RABBITMQ_URL=amqp://guest:guest@127.0.0.1:5672/%2f
#   WATCH_INTERVAL_MS=10    how often idem's /metrics is polled
#   TIMEOUT=60              seconds one measurement may take before it counts as failed
#   PERF=0                  1: perf record --call-graph dwarf (attached to the process once it
#                           is up, 499 Hz) the last round's PERF_SCENARIO row (default `idem`,
#                           SQLite synchronous=full) of each broker, which makes that
#                           row slower; self time by thread and by library, and the time spent
#                           in (and under) selected frames, are printed; the perf.data files
#                           (~10 MB/s) are kept in OUT_DIR
#   IDEM_BIN=path BARE_BIN=path   use these binaries and skip the build; SKIP_BUILD=1 uses
#                           $CARGO_TARGET_DIR (or target)/release/{idem,examples/bare_consumer} as they are
#   BENCH_TMPDIR=dir        where the temporary directory goes (default $TMPDIR or /tmp)
#   KEEP_TMP=1              keep the temporary directory after the run
#   OUT_DIR=dir             where the JSON goes (default bench/out, git-ignored)
#
# Needs: bash, awk, curl, nginx (installed with apt-get when missing), cargo, the brokers;
# perf for PERF=1.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)

MESSAGES=${MESSAGES:-50000}
CONCURRENCY=${CONCURRENCY:-64}
RUNS=${RUNS:-3}
BROKERS=${BROKERS:-nats rabbitmq kafka}
KAFKA_BROKERS=${KAFKA_BROKERS:-}
SQS_URL=${SQS_URL:-}
BROKER_TOOLS=${IDEM_BROKER_TOOLS:-$HOME/.cache/idem-tools/brokers}
SCENARIOS=${SCENARIOS:-bare-ack bare-http idem idem-normal idem-memory}
NATS_URL=${NATS_URL:-nats://127.0.0.1:4222}
RABBITMQ_URL=${RABBITMQ_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
WATCH_INTERVAL_MS=${WATCH_INTERVAL_MS:-10}
TIMEOUT=${TIMEOUT:-60}
PERF=${PERF:-0}
PERF_SCENARIO=${PERF_SCENARIO:-idem}
OUT_DIR=${OUT_DIR:-$HERE/out}
KEEP_TMP=${KEEP_TMP:-0}
SKIP_BUILD=${SKIP_BUILD:-0}

GOAL=0.80 # idem / bare-http
REQ_PATH=/v1/orders
SUBSCRIBER=bench
DURABLE=bench
TAG="idembench$$" # names of this run's streams and queues start with it

SCRIPT=consume.sh
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"

# ---------------------------------------------------------------- inputs and tools

for v in MESSAGES CONCURRENCY RUNS WATCH_INTERVAL_MS TIMEOUT; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer (got '${!v}')"
done
((CONCURRENCY <= 4096)) || die "CONCURRENCY must be at most 4096 (the consumer file's limit)"
read -r -a BROKER_LIST <<<"$BROKERS"
read -r -a SCENARIO_LIST <<<"$SCENARIOS"
((${#BROKER_LIST[@]})) || die "BROKERS is empty"
((${#SCENARIO_LIST[@]})) || die "SCENARIOS is empty"
for b in "${BROKER_LIST[@]}"; do
    [[ $b =~ ^(nats|rabbitmq|kafka|sqs)$ ]] || die "unknown broker '$b' (nats, rabbitmq, kafka, sqs)"
done
for s in "${SCENARIO_LIST[@]}"; do
    [[ $s =~ ^(bare-ack|bare-http|idem|idem-normal|idem-memory)$ ]] ||
        die "unknown scenario '$s' (bare-ack, bare-http, idem, idem-normal, idem-memory)"
done
if [[ $PERF == 1 && " $SCENARIOS " != *" $PERF_SCENARIO "* ]]; then
    die "PERF_SCENARIO=$PERF_SCENARIO is not among SCENARIOS"
fi

need_packages nginx curl
NGINX=$(find_nginx)
[[ -n $NGINX ]] || die "nginx not found after installing it"
if [[ $PERF == 1 ]]; then command -v perf >/dev/null 2>&1 || die "PERF=1 needs perf"; fi

idem_and_example_bins bare_consumer

# ---------------------------------------------------------------- processes and cleanup

QUEUES=()   # RabbitMQ queues this run declared (deleted on exit)
TOPICS=()   # Kafka topics this run created (deleted on exit)
SQS_QUEUES=() # SQS queues this run created (deleted on exit)
USED_NATS=0 # 1 once a stream may exist (those named $TAG* are deleted on exit)
make_tmp idem-consume-bench "logs, consumer files and databases"

# The streams and queues this run created.
extra_cleanup() {
    if [[ $USED_NATS == 1 ]]; then
        "$BARE_BIN" nats-delete --url "$NATS_URL" --prefix "$TAG" >>"$TMP/cleanup.log" 2>&1 || true
    fi
    if ((${#QUEUES[@]})); then
        "$BARE_BIN" rabbit-delete --url "$RABBITMQ_URL" "${QUEUES[@]}" >>"$TMP/cleanup.log" 2>&1 || true
    fi
    if ((${#TOPICS[@]})); then
        "$BARE_BIN" kafka-delete --brokers "$KAFKA_BROKERS" "${TOPICS[@]}" >>"$TMP/cleanup.log" 2>&1 || true
    fi
    if ((${#SQS_QUEUES[@]})); then
        "$BARE_BIN" sqs-delete --sqs "$SQS_URL" "${SQS_QUEUES[@]}" >>"$TMP/cleanup.log" 2>&1 || true
    fi
}

# ---------------------------------------------------------------- the endpoint and brokers

STARTED_AT=$(date -u +%Y-%m-%dT%H:%M:%SZ)
TMP_FS=$(stat -f -c %T "$TMP" 2>/dev/null || echo unknown)
NPROC=$(nproc 2>/dev/null || echo '?')
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')

log "idem consume benchmark: MESSAGES=$MESSAGES CONCURRENCY=$CONCURRENCY RUNS=$RUNS BROKERS='$BROKERS'"
log "  scenarios: $SCENARIOS"
log "  $NPROC cores shared by the brokers, the endpoint nginx and the consumer under test; load average now $LOAD_START"
log "  temporary directory $TMP on $TMP_FS"
if [[ $TMP_FS == tmpfs || $TMP_FS == ramfs ]]; then
    log "  WARNING: $TMP is on $TMP_FS: fsync is free there, so synchronous=full costs less than on a disk."
fi
log "  idem binary $IDEM_BIN"

start_nginx_upstream endpoint /_bench_status
ENDPOINT_URL=$UPSTREAM_URL$REQ_PATH
check_counted_upstream "$ENDPOINT_URL" '{"id":"check"}' -H 'Idempotency-Key: check'

for b in "${BROKER_LIST[@]}"; do
    case $b in
    nats)
        USED_NATS=1
        "$BARE_BIN" nats-delete --url "$NATS_URL" --prefix "$TAG" >"$TMP/probe-nats.log" 2>&1 ||
            { show_files "$TMP/probe-nats.log"; die "NATS JetStream at $NATS_URL is not reachable"; }
        ;;
    rabbitmq)
        "$BARE_BIN" rabbit-delete --url "$RABBITMQ_URL" >"$TMP/probe-rabbitmq.log" 2>&1 ||
            { show_files "$TMP/probe-rabbitmq.log"; die "RabbitMQ at $RABBITMQ_URL is not reachable"; }
        ;;
    kafka)
        if [[ -z $KAFKA_BROKERS ]]; then
            [[ -x $BROKER_TOOLS/bin/tansu ]] || die "no tansu in $BROKER_TOOLS: run ./scripts/install-broker-tools"
            free_port port
            start tansu "$BROKER_TOOLS/bin/tansu" broker --listener-url "tcp://127.0.0.1:$port" \
                --advertised-listener-url "tcp://127.0.0.1:$port" --storage-engine memory://tansu/
            wait_port tansu "$port"
            KAFKA_BROKERS=127.0.0.1:$port
            log "  Kafka: a private tansu ($("$BROKER_TOOLS/bin/tansu" --version)) at $KAFKA_BROKERS"
        fi
        ;;
    sqs)
        export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-test} AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-test}
        if [[ -z $SQS_URL ]]; then
            [[ -x $BROKER_TOOLS/bin/python ]] || die "no venv in $BROKER_TOOLS: run ./scripts/install-broker-tools"
            free_port port
            start moto "$BROKER_TOOLS/bin/python" -m moto.server -H 127.0.0.1 -p "$port"
            wait_port moto "$port"
            SQS_URL=http://127.0.0.1:$port
            log "  SQS: a private moto server at $SQS_URL"
        fi
        ;;
    esac
done

# ---------------------------------------------------------------- measuring

declare -A SECS=() RATE=() WALL=() CPU=() RUNLOG=() PUBRATE=()
ANOMALIES=()
PERF_FILES=()
PERF_TOP=""

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
rate() { awk -v n="$1" -v s="$2" 'BEGIN { if (s > 0) printf "%.0f", n / s; else print 0 }'; }
field() { sed -n "s/.* $2=\([^ ]*\).*/\1/p" <<<" $1"; } # field LINE NAME → value of NAME=value

anomaly() {
    log "  !!!!! $*"
    ANOMALIES+=("$*")
}

# source_name BROKER ROUND SCENARIO → a fresh stream (NATS) or queue (RabbitMQ) name
source_name() {
    local s=${3//-/_}
    if [[ $1 == nats ]]; then echo "${TAG}_${2}_${s}"; else echo "${TAG}-${1}-${2}-${3}"; fi
}

# publish BROKER NAME: a fresh stream / queue holding MESSAGES messages
publish() {
    local broker=$1 name=$2 line
    if [[ $broker == nats ]]; then
        "$BARE_BIN" nats-publish --url "$NATS_URL" --stream "$name" --count "$MESSAGES" \
            >"$TMP/publish.out" 2>"$TMP/publish.err" || { show_files "$TMP/publish.out" "$TMP/publish.err"; die "publishing to NATS failed"; }
    elif [[ $broker == rabbitmq ]]; then
        QUEUES+=("$name")
        "$BARE_BIN" rabbit-publish --url "$RABBITMQ_URL" --queue "$name" --count "$MESSAGES" \
            >"$TMP/publish.out" 2>"$TMP/publish.err" || { show_files "$TMP/publish.out" "$TMP/publish.err"; die "publishing to RabbitMQ failed"; }
    elif [[ $broker == kafka ]]; then
        TOPICS+=("$name")
        "$BARE_BIN" kafka-publish --brokers "$KAFKA_BROKERS" --topic "$name" --count "$MESSAGES" \
            >"$TMP/publish.out" 2>"$TMP/publish.err" || { show_files "$TMP/publish.out" "$TMP/publish.err"; die "publishing to Kafka failed"; }
    else
        SQS_QUEUES+=("$name")
        "$BARE_BIN" sqs-publish --sqs "$SQS_URL" --queue "$name" --count "$MESSAGES" \
            >"$TMP/publish.out" 2>"$TMP/publish.err" || { show_files "$TMP/publish.out" "$TMP/publish.err"; die "publishing to SQS failed"; }
    fi
    line=$(grep '^PUBLISHED ' "$TMP/publish.out")
    PUBRATE[$broker]+="$(field "$line" rate) "
}

drop_source() { # BROKER NAME
    case $1 in
    nats) "$BARE_BIN" nats-delete --url "$NATS_URL" "$2" >>"$TMP/cleanup.log" 2>&1 || true ;;
    rabbitmq) "$BARE_BIN" rabbit-delete --url "$RABBITMQ_URL" "$2" >>"$TMP/cleanup.log" 2>&1 || true ;;
    kafka) "$BARE_BIN" kafka-delete --brokers "$KAFKA_BROKERS" "$2" >>"$TMP/cleanup.log" 2>&1 || true ;;
    sqs) "$BARE_BIN" sqs-delete --sqs "$SQS_URL" "$2" >>"$TMP/cleanup.log" 2>&1 || true ;;
    esac
}

# settled_in_broker BROKER NAME → "" when nothing is left unacknowledged, else what is left
settled_in_broker() {
    local broker=$1 name=$2 line
    if [[ $broker == nats ]]; then
        line=$("$BARE_BIN" nats-info --url "$NATS_URL" --stream "$name" --durable "$DURABLE" 2>&1) || { echo "nats-info failed: $line"; return; }
        [[ $(field "$line" num_pending) == 0 && $(field "$line" num_ack_pending) == 0 &&
            $(field "$line" ack_floor) == "$MESSAGES" ]] || echo "$line"
    elif [[ $broker == rabbitmq ]]; then
        line=$("$BARE_BIN" rabbit-info --url "$RABBITMQ_URL" --queue "$name" 2>&1) || { echo "rabbit-info failed: $line"; return; }
        [[ $(field "$line" ready) == 0 ]] || echo "$line"
    elif [[ $broker == kafka ]]; then
        line=$("$BARE_BIN" kafka-info --brokers "$KAFKA_BROKERS" --topic "$name" --group "$DURABLE" 2>&1) || { echo "kafka-info failed: $line"; return; }
        # The committed offset, not the high watermark: tansu reports the watermark of a
        # batch of records as if it were one.
        [[ $(field "$line" committed) == "$MESSAGES" ]] || echo "$line"
    else
        # The counts are approximate (SQS says so): asked again for a few seconds.
        for _ in 1 2 3 4 5; do
            line=$("$BARE_BIN" sqs-info --sqs "$SQS_URL" --queue "$name" 2>&1) || { echo "sqs-info failed: $line"; return; }
            [[ $(field "$line" visible) == 0 && $(field "$line" in_flight) == 0 ]] && return
            sleep 1
        done
        echo "$line"
    fi
}

# record KEY ROUND SECONDS RATE WALL_SECONDS CPU_SECONDS [extra JSON] [extra log text]
record() {
    local key=$1 round=$2 secs=$3 r=$4 wall=$5 cpu=$6 extra=${7:-} text=${8:-} load us
    load=$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo 0)
    us=$(awk -v c="$cpu" -v n="$MESSAGES" 'BEGIN { printf "%.1f", c * 1e6 / n }')
    SECS[$key]+="$secs "
    RATE[$key]+="$r "
    WALL[$key]+="$(rate "$MESSAGES" "$wall") "
    CPU[$key]+="$us "
    RUNLOG[$key]+="{\"round\":$round,\"messages\":$MESSAGES,\"seconds\":$secs,\"messages_per_s\":$r,\"wall_seconds\":$wall,\"cpu_seconds\":$cpu,\"cpu_us_per_message\":$us,\"loadavg_1m_after\":$load$extra},"
    printf '  round %d  %-22s %8.3f s %8d msg/s  wall %7.3f s  cpu %6.1f us/msg  load %s%s\n' \
        "$round" "$key" "$secs" "$r" "$wall" "$us" "$load" "${text:+  $text}" >&2
}

# run_bare BROKER ROUND SCENARIO NAME
run_bare() {
    local broker=$1 round=$2 scenario=$3 name=$4 before after t0 t1 rc=0 line expect=0 args=()
    [[ $scenario == bare-http ]] && { args=(--endpoint "$ENDPOINT_URL"); expect=$MESSAGES; }
    case $broker in
    nats) args=(nats-consume --url "$NATS_URL" --stream "$name" --durable "$DURABLE" "${args[@]}") ;;
    rabbitmq) args=(rabbit-consume --url "$RABBITMQ_URL" --queue "$name" "${args[@]}") ;;
    kafka) args=(kafka-consume --brokers "$KAFKA_BROKERS" --topic "$name" --group "$DURABLE" "${args[@]}") ;;
    sqs) args=(sqs-consume --sqs "$SQS_URL" --queue "$name" "${args[@]}") ;;
    esac
    before=$(nginx_requests)
    t0=$(now)
    timeout "$TIMEOUT" "$BARE_BIN" "${args[@]}" --count "$MESSAGES" --concurrency "$CONCURRENCY" \
        >"$TMP/bare.out" 2>"$TMP/bare.err" </dev/null || rc=$?
    t1=$(now)
    after=$(nginx_requests)
    upstream_alive
    line=$(grep '^BARE ' "$TMP/bare.out") || { show_files "$TMP/bare.out" "$TMP/bare.err"; die "$broker $scenario round $round: bare_consumer printed no BARE line (exit $rc)"; }
    local problems=() left
    ((rc == 0)) || problems+=("exit status $rc ($line)")
    ((after - before - 1 == expect)) || problems+=("the endpoint received $((after - before - 1)) calls, expected $expect")
    left=$(settled_in_broker "$broker" "$name")
    [[ -z $left ]] || problems+=("left in the broker: $left")
    if ((${#problems[@]})); then
        show_files "$TMP/bare.out" "$TMP/bare.err"
        for p in "${problems[@]}"; do anomaly "$broker $scenario round $round: $p"; done
        exit 3
    fi
    record "$broker/$scenario" "$round" "$(field "$line" seconds)" "$(field "$line" rate)" "$(elapsed "$t0" "$t1")" \
        "$(field "$line" cpu_seconds)" ",\"process_seconds\":$(elapsed "$t0" "$t1"),\"total_seconds\":$(field "$line" total_seconds)"
}

# write_consumer FILE BROKER NAME STORE_URL
write_consumer() {
    local source
    case $2 in
    nats) source="nats = { url = \"$NATS_URL\", stream = \"$3\", subject = \"$3.>\", durable = \"$DURABLE\" }" ;;
    rabbitmq) source="rabbitmq = { url = \"$RABBITMQ_URL\", queue = \"$3\" }" ;;
    kafka) source="kafka = { brokers = \"$KAFKA_BROKERS\", topic = \"$3\", group = \"$DURABLE\" }" ;;
    sqs) source="sqs = { queue_url = \"$SQS_URL/123456789012/$3\", endpoint = \"$SQS_URL\", wait_time = \"1s\" }" ;;
    esac
    cat >"$1" <<EOF
# Written by bench/consume.sh.
subscriber = "$SUBSCRIBER"
store = "$4"
concurrency = $CONCURRENCY
max_attempts = 5
timeout = "30s"

[source]
$source
message_id = { body = "/id" }

[deliver]
method = "POST"
url = "$ENDPOINT_URL"

[admin]
listen = "127.0.0.1:0"
EOF
}

CLK_TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)
# cpu_by_thread PID → "NAME SECONDS" per thread name (user + system CPU so far), and "total SECONDS"
cpu_by_thread() {
    local f
    for f in /proc/"$1"/task/*/stat; do
        # the name is in parentheses and may hold spaces; utime and stime are fields 14 and 15
        sed -e 's/^[0-9]* (\(.*\)) /\1\t/' "$f" 2>/dev/null
    done | awk -F'\t' -v hz="$CLK_TCK" '{ n = split($2, a, " "); t = (a[12] + a[13]) / hz; by[$1] += t; total += t }
        END { for (k in by) printf "%s\t%.3f\n", k, by[k]; printf "total\t%.3f\n", total }'
}

# run_idem BROKER ROUND SCENARIO NAME [perf]
run_idem() {
    local broker=$1 round=$2 scenario=$3 name=$4 perf=${5:-} store before after t0 line admin="" pid rc=0
    local run=$TMP/$broker-$scenario-$round
    case $scenario in
    idem) store="sqlite://$run.db?synchronous=full" ;;
    idem-normal) store="sqlite://$run.db?synchronous=normal" ;;
    idem-memory) store="memory://" ;;
    esac
    write_consumer "$run.toml" "$broker" "$name" "$store"
    before=$(nginx_requests)
    t0=$(now)
    # Output files of their own per run: an old admin address must never be read.
    local tag=${run##*/}
    rm -f "$run.out" "$run.err"
    start "$tag" "$IDEM_BIN" consume "$run.toml"
    pid=$LAST_PID
    for _ in $(seq 300); do
        admin=$(sed -n 's#^idem consume '"$SUBSCRIBER"': admin http://##p' "$run.out" 2>/dev/null || true)
        [[ -n $admin ]] && break
        kill -0 "$pid" 2>/dev/null || { show_files "$run.out" "$run.err"; die "idem consume exited during startup"; }
        sleep 0.05
    done
    [[ -n $admin ]] || { show_files "$run.out" "$run.err"; die "idem consume printed no admin address within 15 s"; }
    local perf_pid=""
    if [[ $perf == perf ]]; then
        # DWARF call graphs: the release build keeps no frame pointers, only line tables.
        perf record -q -F 499 --call-graph dwarf,16384 -p "$pid" -o "$run.perf.data" >"$TMP/perf.out" 2>"$TMP/perf.err" &
        perf_pid=$!
        PIDS+=("$perf_pid")
        PID_NAMES+=(perf)
    fi
    local wrc=0
    "$BARE_BIN" watch --admin "$admin" --subscriber "$SUBSCRIBER" --count "$MESSAGES" \
        --interval-ms "$WATCH_INTERVAL_MS" --timeout "$TIMEOUT" >"$TMP/watch.out" 2>"$TMP/watch.err" || wrc=$?
    cpu_by_thread "$pid" >"$run.cpu"
    if [[ -n $perf_pid ]]; then
        kill -INT "$perf_pid" 2>/dev/null || true
        wait "$perf_pid" 2>/dev/null || true
        forget_pid "$perf_pid"
    fi
    line=$(grep '^WATCH ' "$TMP/watch.out" || true)
    # SIGTERM: a clean stop settles what is in flight and exits 0.
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 300); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    if kill -0 "$pid" 2>/dev/null; then
        anomaly "$broker $scenario round $round: idem consume did not stop within 15 s of SIGTERM"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || rc=$?
    forget_pid "$pid"
    after=$(nginx_requests)
    upstream_alive
    local problems=() left
    ((wrc == 0)) || problems+=("not every message was settled within ${TIMEOUT}s: $line")
    ((rc == 0)) || problems+=("idem consume exited with $rc after SIGTERM")
    [[ $(field "$line" delivered) == "$MESSAGES" ]] || problems+=("idem counted: ${line#WATCH }")
    for d in duplicate stale retry in_flight unknown needs_review malformed store_unavailable; do
        local v
        v=$(field "$line" "$d")
        [[ -z $v || $v == 0 ]] || problems+=("decision $d = $v")
    done
    ((after - before - 1 == MESSAGES)) || problems+=("the endpoint received $((after - before - 1)) calls, expected $MESSAGES")
    left=$(settled_in_broker "$broker" "$name")
    [[ -z $left ]] || problems+=("left in the broker after idem stopped: $left")
    if ((${#problems[@]})); then
        show_files "$run.out" "$run.err" "$TMP/watch.out" "$TMP/watch.err"
        for p in "${problems[@]}"; do anomaly "$broker $scenario round $round: $p"; done
        exit 3
    fi
    local db_bytes=0
    [[ -f $run.db ]] && db_bytes=$(stat -c %s "$run.db")
    # CPU by thread: tokio workers (broker client, HTTP, engine), the SQLite writer, the rest
    local cpu_total workers writer other
    cpu_total=$(awk -F'\t' '$1 == "total" { print $2 }' "$run.cpu")
    workers=$(awk -F'\t' '$1 ~ /^tokio-rt-worker/ { s += $2 } END { printf "%.3f", s }' "$run.cpu")
    writer=$(awk -F'\t' '$1 ~ /sqlite/ { s += $2 } END { printf "%.3f", s }' "$run.cpu")
    other=$(awk -v t="$cpu_total" -v a="$workers" -v b="$writer" 'BEGIN { printf "%.3f", t - a - b }')
    record "$broker/$scenario" "$round" "$(field "$line" seconds)" "$(field "$line" rate)" \
        "$(elapsed "$t0" "$(field "$line" done_at)")" "$cpu_total" \
        ",\"first_seen\":$(field "$line" first_seen),\"store_bytes\":$db_bytes,\"cpu_seconds_by_thread\":{\"tokio_workers\":$workers,\"sqlite_writer\":$writer,\"other\":$other}" \
        "(cpu s: workers $workers, sqlite writer $writer, other $other)"
    rm -f "$run.db" "$run.db-wal" "$run.db-shm"
}

for ((round = 1; round <= RUNS; round++)); do
    log "round $round of $RUNS"
    for broker in "${BROKER_LIST[@]}"; do
        for scenario in "${SCENARIO_LIST[@]}"; do
            name=$(source_name "$broker" "$round" "$scenario")
            publish "$broker" "$name"
            case $scenario in
            bare-*) run_bare "$broker" "$round" "$scenario" "$name" ;;
            idem*)
                perf_arg=""
                [[ $PERF == 1 && $round == "$RUNS" && $scenario == "$PERF_SCENARIO" ]] && perf_arg=perf
                run_idem "$broker" "$round" "$scenario" "$name" $perf_arg
                if [[ -n $perf_arg ]]; then PERF_FILES+=("$broker:$scenario:$TMP/$broker-$scenario-$round.perf.data"); fi
                ;;
            esac
            drop_source "$broker" "$name"
        done
    done
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')

if ((${#PERF_FILES[@]})); then
    mkdir -p "$OUT_DIR"
    stamp=$(date -u +%Y%m%dT%H%M%SZ)
    for entry in "${PERF_FILES[@]}"; do
        IFS=: read -r broker scenario file <<<"$entry"
        f=$OUT_DIR/consume-$broker-$scenario-$stamp.perf.data
        mv "$file" "$f"
        PERF_TOP+="--- $broker $scenario (last round): self time by thread"$'\n'
        PERF_TOP+=$(perf report -i "$f" --no-children --stdio --sort comm -g none 2>/dev/null |
            grep -E '^ +[0-9.]+%' | head -n 8 || true)
        PERF_TOP+=$'\n'"--- $broker $scenario (last round): self time by shared object"$'\n'
        PERF_TOP+=$(perf report -i "$f" --no-children --stdio --sort dso -g none 2>/dev/null |
            grep -E '^ +[0-9.]+%' | head -n 6 || true)
        PERF_TOP+=$'\n'"--- $broker $scenario (last round): time including callees (children, self), selected frames"$'\n'
        PERF_TOP+=$(perf report -i "$f" --children --stdio --sort sym -g none 2>/dev/null |
            grep -E '^ +[0-9.]+%' | grep -v '(inlined)' |
            grep -E 'idem::|reqwest::async_impl::client::Client::execute_request|hyper::proto::h1::dispatch|async_nats::connect_with_options|execute_batch|unixSync|unixShmLock|sqlite3PagerSharedLock|__x64_sys_(futex|fsync|pwrite64|fcntl|writev|recvfrom|epoll_wait)' |
            head -n 30 || true)
        PERF_TOP+=$'\n'"(perf.data: $f)"$'\n'
    done
fi

# ---------------------------------------------------------------- report

median() {
    printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END {
        if (NR == 0) exit 1
        if (NR % 2) printf "%.6g\n", a[(NR + 1) / 2]; else printf "%.6g\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.3f", a / b }'; }

declare -A LABEL=(
    [bare-ack]="bare client: consume + ack only"
    [bare-http]="bare client: consume + POST + ack"
    [idem]="idem consume"
    [idem-normal]="idem consume"
    [idem-memory]="idem consume"
)
declare -A STORE_OF=(
    [idem]="sqlite sync=full"
    [idem-normal]="sqlite sync=normal"
    [idem-memory]="memory://"
)
declare -A MED_SECS=() MED_RATE=() MED_WALL=() MED_CPU=() R_HTTP=() R_ACK=() NOTE=()
for broker in "${BROKER_LIST[@]}"; do
    for s in "${SCENARIO_LIST[@]}"; do
        k=$broker/$s
        # shellcheck disable=SC2086 # word splitting intended
        MED_SECS[$k]=$(median ${SECS[$k]})
        # shellcheck disable=SC2086
        MED_RATE[$k]=$(median ${RATE[$k]})
        # shellcheck disable=SC2086
        MED_WALL[$k]=$(median ${WALL[$k]})
        # shellcheck disable=SC2086
        MED_CPU[$k]=$(median ${CPU[$k]})
    done
    for s in "${SCENARIO_LIST[@]}"; do
        k=$broker/$s
        [[ -n ${MED_RATE[$broker/bare-http]:-} && $s != bare-http ]] && R_HTTP[$k]=$(ratio "${MED_RATE[$k]}" "${MED_RATE[$broker/bare-http]}")
        [[ -n ${MED_RATE[$broker/bare-ack]:-} && $s != bare-ack ]] && R_ACK[$k]=$(ratio "${MED_RATE[$k]}" "${MED_RATE[$broker/bare-ack]}")
        if [[ $s == idem* && -n ${R_HTTP[$k]:-} ]]; then
            if awk -v r="${R_HTTP[$k]}" -v g="$GOAL" 'BEGIN { exit !(r >= g) }'; then
                NOTE[$k]="goal >= ${GOAL}x bare-http: met"
            else
                NOTE[$k]="goal >= ${GOAL}x bare-http: NOT MET"
            fi
        fi
    done
done

echo
echo "idem consume benchmark — $STARTED_AT, commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "$MESSAGES messages of ~110 B per row, concurrency $CONCURRENCY, median of $RUNS round(s), steady-state rate" \
    "(first to last message settled); $NPROC cores shared with the brokers and the endpoint nginx;" \
    "load average $LOAD_START at start, $LOAD_END at end; SQLite on $TMP_FS"
for broker in "${BROKER_LIST[@]}"; do
    echo
    # shellcheck disable=SC2086
    echo "== $broker (publishing, for reference: $(median ${PUBRATE[$broker]}) msg/s median)"
    printf '%-34s %-18s %8s %8s %9s %9s %10s %9s %9s  %s\n' scenario store messages seconds "msg/s" "wall/s" \
        "cpu us/msg" "x http" "x ack" ""
    printf '%-34s %-18s %8s %8s %9s %9s %10s %9s %9s  %s\n' "----------------------------------" "------------------" \
        "--------" "--------" "---------" "---------" "----------" "---------" "---------" ""
    for s in "${SCENARIO_LIST[@]}"; do
        k=$broker/$s
        printf '%-34s %-18s %8d %8.3f %9.0f %9.0f %10.1f %9s %9s  %s\n' "${LABEL[$s]}" "${STORE_OF[$s]:--}" "$MESSAGES" \
            "${MED_SECS[$k]}" "${MED_RATE[$k]}" "${MED_WALL[$k]}" "${MED_CPU[$k]}" "${R_HTTP[$k]:+${R_HTTP[$k]}x}" \
            "${R_ACK[$k]:+${R_ACK[$k]}x}" "${NOTE[$k]:-}"
    done
done
echo
echo "msg/s: steady state, first to last message settled; wall/s: from process start (connect, consumer and"
echo "store set-up included) to the last settlement; cpu us/msg: the consumer process's own user + system CPU"
echo "(not the broker's nor nginx's) over the messages; x http / x ack: msg/s over the bare client's, same broker."
if [[ -n $PERF_TOP ]]; then
    echo
    echo "perf record of the last $PERF_SCENARIO row of each broker (percentages of the idem process's samples):"
    echo "$PERF_TOP"
fi
echo

json_string() {
    local s=$1
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\n'/\\n}
    s=${s//$'\t'/\\t}
    printf '"%s"' "$s"
}

mkdir -p "$OUT_DIR"
OUT_FILE=$OUT_DIR/consume-$(date -u +%Y%m%dT%H%M%SZ).json
{
    printf '{\n'
    printf '  "benchmark": "idem consume vs the broker client'"'"'s own consume-and-ack loop",\n'
    printf '  "started_at": %s,\n' "$(json_string "$STARTED_AT")"
    printf '  "commit": %s,\n' "$(json_string "$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)")"
    printf '  "worktree_dirty": %s,\n' "$([[ -n $(git -C "$ROOT" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null) ]] && echo true || echo false)"
    printf '  "host": {"cores": %s, "kernel": %s, "loadavg_start": %s, "loadavg_end": %s, "tmp_fs": %s},\n' \
        "$NPROC" "$(json_string "$(uname -r)")" "$(json_string "$LOAD_START")" "$(json_string "$LOAD_END")" "$(json_string "$TMP_FS")"
    printf '  "tools": {"nginx": %s},\n' "$(json_string "$("$NGINX" -v 2>&1 | head -1)")"
    printf '  "settings": {"messages": %s, "concurrency": %s, "runs": %s, "brokers": %s, "watch_interval_ms": %s, "message_id": "body /id"},\n' \
        "$MESSAGES" "$CONCURRENCY" "$RUNS" "$(json_string "$BROKERS")" "$WATCH_INTERVAL_MS"
    printf '  "goal_idem_vs_bare_http": %s,\n' "$GOAL"
    printf '  "scenarios": [\n'
    sep=""
    for broker in "${BROKER_LIST[@]}"; do
        for s in "${SCENARIO_LIST[@]}"; do
            k=$broker/$s
            printf '%s    {"broker": %s, "name": %s, "label": %s, "store": %s, "messages": %s, "seconds": %s, "messages_per_s": %s, "wall_messages_per_s": %s, "cpu_us_per_message": %s, "ratio_to_bare_http": %s, "ratio_to_bare_ack": %s, "note": %s,\n' \
                "$sep" "$(json_string "$broker")" "$(json_string "$s")" "$(json_string "${LABEL[$s]}")" \
                "$(json_string "${STORE_OF[$s]:-}")" "$MESSAGES" "${MED_SECS[$k]}" "${MED_RATE[$k]}" "${MED_WALL[$k]}" \
                "${MED_CPU[$k]}" "${R_HTTP[$k]:-null}" "${R_ACK[$k]:-null}" "$(json_string "${NOTE[$k]:-}")"
            printf '     "runs": [%s]}' "${RUNLOG[$k]%,}"
            sep=$',\n'
        done
    done
    printf '\n  ],\n'
    printf '  "publish_messages_per_s": {'
    sep=""
    for broker in "${BROKER_LIST[@]}"; do
        # shellcheck disable=SC2086
        printf '%s%s: %s' "$sep" "$(json_string "$broker")" "$(median ${PUBRATE[$broker]})"
        sep=", "
    done
    printf '},\n'
    printf '  "perf_top": %s,\n' "$(json_string "$PERF_TOP")"
    printf '  "anomalies": ['
    sep=""
    for a in "${ANOMALIES[@]}"; do
        printf '%s%s' "$sep" "$(json_string "$a")"
        sep=", "
    done
    printf ']\n'
    printf '}\n'
} >"$OUT_FILE"
echo "wrote $OUT_FILE"
