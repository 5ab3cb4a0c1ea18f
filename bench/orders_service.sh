#!/usr/bin/env bash
# bench/orders_service.sh — what idem's transactional layer costs a real service: the
# example service's POST /orders (examples/orders_service.rs) with idem, where the claim,
# the INSERT and the stored answer commit in one PostgreSQL transaction, against the same
# handler without idem (--without-idem: the INSERT in a transaction of its own, no key),
# both measured in the same run, alternating, against the same database.
#
#   with     wrk → orders_service (idem, transactional) → PostgreSQL; a new key per request
#   without  wrk → orders_service --without-idem → PostgreSQL                 (the baseline)
#
# Printed per row, medians over RUNS rounds: requests/s, p50 and p99 latency, the service's
# CPU time per request (utime+stime from /proc), its write system calls per request (syscw
# from /proc/PID/io; hyper and tokio-postgres coalesce writes under load, so this is a cost
# figure, not a round-trip count), and PostgreSQL commits per request
# (pg_stat_database.xact_commit, read after the server flushed its statistics). The ratio
# is with ÷ without. Round trips by design: without idem BEGIN, INSERT, COMMIT (3); with
# idem BEGIN+claim+reset pipelined, INSERT, UPDATE+COMMIT pipelined (3).
#
# Settings (environment):
#   DURATION=10s RUNS=3 CONNECTIONS=32 THREADS=1   wrk settings
#   DATABASE_URL=postgres://root@127.0.0.1:5432/test  a server where a database can be created
#   SKIP_BUILD=1    use target/release/examples/orders_service as it is
# Needs: bash, wrk, curl, psql, cargo. Runs on loopback only.
set -euo pipefail
SCRIPT=orders_service.sh
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
source "$ROOT/bench/lib.sh"

DURATION=${DURATION:-10s}
RUNS=${RUNS:-3}
CONNECTIONS=${CONNECTIONS:-32}
THREADS=${THREADS:-1}
DATABASE_URL=${DATABASE_URL:-postgres://root@127.0.0.1:5432/test}

need_packages wrk curl
command -v psql >/dev/null 2>&1 || die "psql not found (it comes with the PostgreSQL client package)"
[[ ${SKIP_BUILD:-0} == 1 ]] || release_build --example orders_service
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
SERVICE=$TARGET_DIR/release/examples/orders_service
[[ -x $SERVICE ]] || die "$SERVICE does not exist"

make_tmp orders-bench
DB=idem_bench_$$
psql "$DATABASE_URL" -q -c "CREATE DATABASE $DB" || die "cannot create database $DB"
extra_cleanup() { psql "$DATABASE_URL" -q -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)"; }
BENCH_URL=${DATABASE_URL%/*}/$DB

free_port WITH_PORT
free_port WITHOUT_PORT
start with "$SERVICE" --listen "127.0.0.1:$WITH_PORT" --database-url "$BENCH_URL"
WITH_PID=$LAST_PID
wait_port with "$WITH_PORT"
start without "$SERVICE" --listen "127.0.0.1:$WITHOUT_PORT" --database-url "$BENCH_URL" --without-idem
WITHOUT_PID=$LAST_PID
wait_port without "$WITHOUT_PORT"

# cpu_ticks PID, writes PID, commits: counters read before and after each run.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
writes() { awk '/^syscw:/ { print $2 }' "/proc/$1/io"; }
commits() { psql "$BENCH_URL" -Atq -c "SELECT xact_commit FROM pg_stat_database WHERE datname = '$DB'"; }
TICK_US=$((1000000 / $(getconf CLK_TCK)))

BODY='{"sku":"bench","qty":1}'
# run NAME PORT PID ROUND: one wrk run; appends "rps p50 p99 cpu_us writes xacts" to $TMP/NAME.
run() {
    local name=$1 port=$2 pid=$3 round=$4 t0 w0 x0 line requests
    t0=$(cpu_ticks "$pid")
    w0=$(writes "$pid")
    x0=$(commits)
    line=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -s "$ROOT/bench/wrk/post.lua" \
        "http://127.0.0.1:$port/orders" -- unique "$name-$round-$$" "$BODY" 201 | grep '^BENCH')
    sleep 1.5 # PostgreSQL flushes a backend's statistics at most once a second
    requests=$(sed -E 's/.*requests=([0-9]+).*/\1/' <<<"$line")
    [[ $requests -gt 0 ]] || die "$name: no request completed: $line"
    grep -q 'unexpected_status=0 ' <<<"$line" || die "$name: answers other than 201: $line"
    awk -v l="$line" -v r="$requests" -v dt=$(($(cpu_ticks "$pid") - t0)) -v dw=$(($(writes "$pid") - w0)) \
        -v dx=$(($(commits) - x0)) -v tick="$TICK_US" 'BEGIN {
            match(l, /rps=[0-9.]+/); rps = substr(l, RSTART + 4, RLENGTH - 4)
            match(l, /p50_us=[0-9]+/); p50 = substr(l, RSTART + 7, RLENGTH - 7)
            match(l, /p99_us=[0-9]+/); p99 = substr(l, RSTART + 7, RLENGTH - 7)
            printf "%s %s %s %.1f %.2f %.2f\n", rps, p50, p99, dt * tick / r, dw / r, dx / r }' >>"$TMP/$name"
}

for round in $(seq "$RUNS"); do
    log "round $round of $RUNS"
    run without "$WITHOUT_PORT" "$WITHOUT_PID" "$round"
    run with "$WITH_PORT" "$WITH_PID" "$round"
done

median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
column() { awk -v c="$2" '{ print $c }' "$TMP/$1" | median; }

printf '\n%-9s %10s %9s %9s %12s %14s %12s\n' row "req/s" "p50 ms" "p99 ms" "CPU µs/req" "writes/req" "xacts/req"
for name in without with; do
    printf '%-9s %10.0f %9.2f %9.2f %12.1f %14.2f %12.2f\n' "$name" "$(column "$name" 1)" \
        "$(awk -v v="$(column "$name" 2)" 'BEGIN { print v / 1000 }')" \
        "$(awk -v v="$(column "$name" 3)" 'BEGIN { print v / 1000 }')" \
        "$(column "$name" 4)" "$(column "$name" 5)" "$(column "$name" 6)"
done
awk -v a="$(column with 1)" -v b="$(column without 1)" -v wa="$(column with 5)" -v wb="$(column without 5)" \
    -v ca="$(column with 4)" -v cb="$(column without 4)" 'BEGIN {
        printf "\nwith idem ÷ without: %.2f× the requests/s, %.2f× the service CPU per request, %+.2f write calls per request\n", a / b, ca / cb, wa - wb }'
printf 'wrk -t%s -c%s -d%s, %s rounds, medians; %s cores; PostgreSQL %s\n' "$THREADS" "$CONNECTIONS" "$DURATION" "$RUNS" \
    "$(nproc)" "$(psql "$BENCH_URL" -Atq -c 'SHOW server_version')"
