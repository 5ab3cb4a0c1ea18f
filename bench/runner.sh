#!/usr/bin/env bash
# bench/runner.sh — throughput of `idem run`: the re-run of records already sent, and the
# send rate against a fast upstream next to a bare HTTP client loop.
#
# A benchmark, not a test: it prints numbers and never fails on them. It exits 1 when it
# could not measure (a process died, a setup check failed) and 3 when a run did the wrong
# thing — the send run did not send every record exactly once, or the re-run sent anything
# — because then the numbers mean nothing.
#
# What runs, all on 127.0.0.1 with a free port, in a temporary directory that is removed on
# exit with every process this script started (kept, logs and all, when the run fails):
#   upstream   nginx, 1 worker, answers every request `201 {"id":"x"}` without touching
#              the disk (bench/nginx/upstream.conf.in, plus a stub_status location that
#              this script adds to count the calls it really received)
#   records    RECORDS lines of JSON Lines, ~100 bytes each, unique `order_id`
#              (records.jsonl), and its first SEND_RECORDS lines (send.jsonl)
#   flow       one step: POST the record itself (no body template) to the upstream,
#              key_strategy = "primary_key", the default Idempotency-Key header,
#              concurrency = CONCURRENCY, no rate limit
#
# Scenarios:
#   setup       `idem run` sends all RECORDS once into RERUN_STORE (a row of its own: the
#               send rate at that size on that store)
#   bare        examples/bare_client.rs: the same bodies from send.jsonl, the same client
#               (reqwest, one keep-alive pool, multi-threaded tokio), CONCURRENCY POSTs in
#               flight, no store; the file is read into memory before the clock starts
#   send        `idem run` sends send.jsonl into a fresh SQLite store (SEND_STORE_SYNC,
#               durable `full` by default), every round on a new file     (goal >= 0.8x bare)
#   rerun       `idem run` again on RERUN_STORE, the same URL as the setup run: every
#               record is "already sent", no call may reach the upstream  (goal >= 200k/s)
#   hash-floor  examples/bare_client.rs hash: read records.jsonl line by line, parse each
#               line as JSON, SHA-256 its primary key — what a re-run cannot avoid doing,
#               without the store (the re-run's ratio is to this floor)
#   wc          `wc -l records.jsonl`: reading the file alone (page cache)
# The `idem run` rows are timed from process start to exit (opening the store and the
# summary included); every one of them is cross-checked against its summary ("calls sent",
# "skipped (already sent)", "retried", "needs review") and against the upstream's own
# request counter (nginx stub_status, minus the counter's own requests).
#
# Each round runs bare, send, rerun, hash-floor and wc once, in turn, so background noise
# spreads over all rows alike; a row reports the median over RUNS rounds.
#
# THE MACHINE MATTERS. On the reference machine (2 cores) the upstream nginx and the client
# under test share the cores, so the send ratio is a comparison between rows of the same
# run. The SQLite files live in the temporary directory: its filesystem decides what an
# fsync costs (printed; tmpfs makes `full` free).
#
# Default run time on the reference machine: setup (1 M records sent, a few minutes) +
# 3 rounds x (2 x 100 k sends + 1 M re-run + floors): roughly 5-8 minutes.
#
# Usage:
#   bench/runner.sh                                        # defaults
#   RECORDS=200000 SEND_RECORDS=50000 RUNS=1 bench/runner.sh   # a quick look
#   PERF=1 bench/runner.sh                 # also `perf record -g` the last send and re-run
#
# Environment:
#   RECORDS=1000000       records in the re-run file
#   SEND_RECORDS=100000   records sent by `send` and `bare` per round (at most RECORDS)
#   CONCURRENCY=64        records in flight (`concurrency` of the flow; bare client tasks)
#   RUNS=3                rounds
#   SEND_STORE_SYNC=full      SQLite synchronous= of the send rounds' stores
#   RERUN_STORE_SYNC=normal   SQLite synchronous= of the re-run store (setup and re-runs
#                             use this same URL; `normal` only makes the setup faster —
#                             a replay does not wait for an fsync either way)
#   PERF=0                1: perf record -g the last send and the last re-run (which makes
#                         that round a little slower); the top of
#                         `perf report` (by thread, by symbol) is printed and the
#                         perf.data files are kept in OUT_DIR
#   IDEM_BIN=path BARE_BIN=path   use these binaries and skip the build; SKIP_BUILD=1
#                         uses $CARGO_TARGET_DIR (or target)/release/{idem,examples/bare_client} as they are
#   BENCH_TMPDIR=dir      where the temporary directory goes (default $TMPDIR or /tmp)
#   KEEP_TMP=1            keep the temporary directory after the run
#   OUT_DIR=dir           where the JSON goes (default bench/out, git-ignored)
#
# Needs: bash, awk, curl, nginx (installed with apt-get when missing), cargo; perf for PERF=1.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)

RECORDS=${RECORDS:-1000000}
SEND_RECORDS=${SEND_RECORDS:-100000}
CONCURRENCY=${CONCURRENCY:-64}
RUNS=${RUNS:-3}
SEND_STORE_SYNC=${SEND_STORE_SYNC:-full}
RERUN_STORE_SYNC=${RERUN_STORE_SYNC:-normal}
PERF=${PERF:-0}
OUT_DIR=${OUT_DIR:-$HERE/out}
KEEP_TMP=${KEEP_TMP:-0}
SKIP_BUILD=${SKIP_BUILD:-0}

GOAL_SEND=0.80     # x the bare client
GOAL_RERUN=200000  # records/s
REQ_PATH=/v1/orders
FLOW_NAME=bench
STEP_NAME=post

SCRIPT=runner.sh
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"

# ---------------------------------------------------------------- inputs and tools

for v in RECORDS SEND_RECORDS CONCURRENCY RUNS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer (got '${!v}')"
done
((SEND_RECORDS <= RECORDS)) || die "SEND_RECORDS ($SEND_RECORDS) must be at most RECORDS ($RECORDS)"
((CONCURRENCY <= 1024)) || die "CONCURRENCY must be at most 1024 (the flow's limit)"
for v in SEND_STORE_SYNC RERUN_STORE_SYNC; do
    [[ ${!v} =~ ^(off|normal|full|extra)$ ]] || die "$v must be off, normal, full or extra (got '${!v}')"
done

need_packages nginx curl
NGINX=$(find_nginx)
[[ -n $NGINX ]] || die "nginx not found after installing it"
if [[ $PERF == 1 ]]; then command -v perf >/dev/null 2>&1 || die "PERF=1 needs perf"; fi

idem_and_example_bins bare_client

# ---------------------------------------------------------------- processes and cleanup

make_tmp idem-runner-bench "logs, records and databases"

# ---------------------------------------------------------------- the upstream

STARTED_AT=$(date -u +%Y-%m-%dT%H:%M:%SZ)
TMP_FS=$(stat -f -c %T "$TMP" 2>/dev/null || echo unknown)
NPROC=$(nproc 2>/dev/null || echo '?')
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')

log "idem run benchmark: RECORDS=$RECORDS SEND_RECORDS=$SEND_RECORDS CONCURRENCY=$CONCURRENCY RUNS=$RUNS"
log "  $NPROC cores shared by the upstream nginx and the client under test; load average now $LOAD_START"
log "  temporary directory $TMP on $TMP_FS"
if [[ $TMP_FS == tmpfs || $TMP_FS == ramfs ]]; then
    log "  WARNING: $TMP is on $TMP_FS: fsync is free there, so synchronous=full costs less than on a disk."
fi
log "  idem binary $IDEM_BIN"

start_nginx_upstream upstream /_bench_status
check_counted_upstream "$UPSTREAM_URL$REQ_PATH" '{"order_id":"check"}'

# ---------------------------------------------------------------- the records and the flow

log "generating $RECORDS records"
awk -v n="$RECORDS" 'BEGIN {
    for (i = 1; i <= n; i++)
        printf "{\"order_id\":\"o-%08d\",\"customer\":\"cus_%d\",\"amount\":%d,\"currency\":\"EUR\",\"note\":\"bench\"}\n",
            i, i % 9973, 100 + (i * 7919) % 100000
}' >"$TMP/records.jsonl"
head -n "$SEND_RECORDS" "$TMP/records.jsonl" >"$TMP/send.jsonl"
RECORD_BYTES=$(stat -c %s "$TMP/records.jsonl")
SAMPLE_RECORD=$(head -n 1 "$TMP/records.jsonl")

# write_flow FILE SOURCE STORE_URL
write_flow() {
    cat >"$1" <<EOF
# Written by bench/runner.sh.
flow = "$FLOW_NAME"
store = "$3"
retention = "30d"
concurrency = $CONCURRENCY
max_attempts = 5
timeout = "30s"

[source]
jsonl = "$2"
primary_key = ["order_id"]

[[steps]]
name = "$STEP_NAME"
method = "POST"
url = "$UPSTREAM_URL$REQ_PATH"
key_strategy = "primary_key"
EOF
}

RERUN_STORE="sqlite://$TMP/rerun.db?synchronous=$RERUN_STORE_SYNC"
write_flow "$TMP/rerun.toml" records.jsonl "$RERUN_STORE"

# ---------------------------------------------------------------- measuring

declare -A SECS=() RATE=() RUNLOG=()
ANOMALIES=()
LAST_SECONDS=0

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
rate() { awk -v n="$1" -v s="$2" 'BEGIN { if (s > 0) printf "%.0f", n / s; else print 0 }'; }

anomaly() {
    log "  !!!!! $*"
    ANOMALIES+=("$*")
}

# summary_field FILE NAME → the count of a summary line `NAME: n` (empty when absent)
summary_field() { awk -v name="$2" 'index($0, name ": ") == 1 { print substr($0, length(name) + 3) }' "$1"; }

# idem_run NAME FLOW EXPECT_CALLS EXPECT_SKIPPED [perf]: runs the flow, checks it, sets LAST_SECONDS
idem_run() {
    local name=$1 flow=$2 calls=$3 skipped=$4 perf=${5:-} before after t0 t1 rc=0 got s
    before=$(nginx_requests)
    local cmd=("$IDEM_BIN" run "$flow")
    if [[ $perf == perf ]]; then
        cmd=(perf record -q -F 999 -g -o "$TMP/$name.perf.data" -- "${cmd[@]}")
    fi
    t0=$(now)
    "${cmd[@]}" >"$TMP/$name.out" 2>"$TMP/$name.err" </dev/null || rc=$?
    t1=$(now)
    after=$(nginx_requests)
    upstream_alive
    LAST_SECONDS=$(elapsed "$t0" "$t1")
    local received=$((after - before - 1))
    local problems=()
    ((rc == 0)) || problems+=("exit status $rc")
    for s in "records:$((calls + skipped))" "calls sent:$calls" "skipped (already sent):$skipped" \
        "retried:0" "needs review:0" "bad source lines:0"; do
        got=$(summary_field "$TMP/$name.out" "${s%:*}")
        [[ $got == "${s##*:}" ]] || problems+=("summary '${s%:*}' is '${got:-missing}', expected ${s##*:}")
    done
    ((received == calls)) || problems+=("the upstream received $received calls, expected $calls")
    if ((${#problems[@]})); then
        show_files "$TMP/$name.out" "$TMP/$name.err"
        for s in "${problems[@]}"; do anomaly "$name: $s"; done
        return 1
    fi
    return 0
}

# record SCENARIO ROUND RECORDS SECONDS [extra JSON]
record() {
    local s=$1 round=$2 n=$3 secs=$4 extra=${5:-} r load
    r=$(rate "$n" "$secs")
    load=$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo 0)
    SECS[$s]+="$secs "
    RATE[$s]+="$r "
    RUNLOG[$s]+="{\"round\":$round,\"records\":$n,\"seconds\":$secs,\"records_per_s\":$r,\"loadavg_1m_after\":$load$extra},"
    printf '  round %d  %-34s %9d records %9.3f s %10d records/s  load %s\n' "$round" "$s" "$n" "$secs" "$r" "$load" >&2
}

log "setup: idem run sends all $RECORDS records into $RERUN_STORE"
idem_run setup "$TMP/rerun.toml" "$RECORDS" 0 || exit 3
record setup 0 "$RECORDS" "$LAST_SECONDS"
RERUN_DB_BYTES=$(stat -c %s "$TMP/rerun.db" 2>/dev/null || echo 0)

for ((round = 1; round <= RUNS; round++)); do
    log "round $round of $RUNS"

    # bare client: the same bodies to the same URL
    before=$(nginx_requests)
    t0=$(now)
    rc=0
    "$BARE_BIN" send --file "$TMP/send.jsonl" --url "$UPSTREAM_URL$REQ_PATH" --concurrency "$CONCURRENCY" \
        --key-field order_id --key-prefix "$FLOW_NAME:$STEP_NAME" >"$TMP/bare.out" 2>"$TMP/bare.err" || rc=$?
    t1=$(now)
    after=$(nginx_requests)
    upstream_alive
    line=$(grep '^BARE ' "$TMP/bare.out") || { show_files "$TMP/bare.out" "$TMP/bare.err"; die "bare_client printed no BARE line"; }
    bare_secs=$(sed -n 's/.* seconds=\([0-9.]*\).*/\1/p' <<<"$line")
    ((rc == 0)) || { show_files "$TMP/bare.out" "$TMP/bare.err"; anomaly "bare round $round: exit status $rc ($line)"; exit 3; }
    ((after - before - 1 == SEND_RECORDS)) || { anomaly "bare round $round: the upstream received $((after - before - 1)) calls, expected $SEND_RECORDS"; exit 3; }
    record bare "$round" "$SEND_RECORDS" "$bare_secs" ",\"process_seconds\":$(elapsed "$t0" "$t1")"

    # idem run: the same records into a fresh store
    perf_arg=""
    ((PERF == 1 && round == RUNS)) && perf_arg=perf
    write_flow "$TMP/send-$round.toml" send.jsonl "sqlite://$TMP/send-$round.db?synchronous=$SEND_STORE_SYNC"
    idem_run "send-$round" "$TMP/send-$round.toml" "$SEND_RECORDS" 0 $perf_arg || exit 3
    record send "$round" "$SEND_RECORDS" "$LAST_SECONDS"
    rm -f "$TMP/send-$round.db" "$TMP/send-$round.db-wal" "$TMP/send-$round.db-shm"

    # the re-run: everything already sent
    idem_run "rerun-$round" "$TMP/rerun.toml" 0 "$RECORDS" $perf_arg || exit 3
    record rerun "$round" "$RECORDS" "$LAST_SECONDS"

    # the floors
    line=$("$BARE_BIN" hash --file "$TMP/records.jsonl" --key-field order_id) || die "bare_client hash failed"
    record hash-floor "$round" "$RECORDS" "$(sed -n 's/.* seconds=\([0-9.]*\).*/\1/p' <<<"$line")"
    t0=$(now)
    lines=$(wc -l <"$TMP/records.jsonl")
    t1=$(now)
    ((lines == RECORDS)) || die "wc counted $lines lines, not $RECORDS"
    record wc "$round" "$RECORDS" "$(elapsed "$t0" "$t1")"
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')

PERF_TOP=""
PERF_FILES=""
if [[ $PERF == 1 ]]; then
    mkdir -p "$OUT_DIR"
    stamp=$(date -u +%Y%m%dT%H%M%SZ)
    for what in send rerun; do
        f=$OUT_DIR/runner-$what-$stamp.perf.data
        mv "$TMP/$what-$RUNS.perf.data" "$f"
        PERF_FILES+="$f "
        PERF_TOP+="--- the last $what: self time by thread"$'\n'
        PERF_TOP+=$(perf report -i "$f" --no-children --stdio --sort comm -g none 2>/dev/null |
            grep -E '^ +[0-9.]+%' | head -n 8 || true)
        PERF_TOP+=$'\n'"--- the last $what: self time by shared object and symbol"$'\n'
        PERF_TOP+=$(perf report -i "$f" --no-children --stdio --sort dso,sym -g none 2>/dev/null |
            grep -E '^ +[0-9.]+%' | head -n 20 || true)
        PERF_TOP+=$'\n'
    done
fi

# ---------------------------------------------------------------- report

median() {
    printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END {
        if (NR == 0) exit 1
        if (NR % 2) printf "%.6g\n", a[(NR + 1) / 2]; else printf "%.6g\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

SCENARIOS=(setup bare send rerun hash-floor wc)
declare -A LABEL=(
    [setup]="idem run: send all (setup)"
    [bare]="bare client loop (reqwest)"
    [send]="idem run: send"
    [rerun]="idem run: re-run, all already sent"
    [hash-floor]="floor: read+parse+SHA-256 key"
    [wc]="floor: wc -l"
)
declare -A STORE_OF=(
    [setup]="sqlite sync=$RERUN_STORE_SYNC"
    [send]="sqlite sync=$SEND_STORE_SYNC"
    [rerun]="sqlite sync=$RERUN_STORE_SYNC"
)
declare -A N_OF=([setup]=$RECORDS [bare]=$SEND_RECORDS [send]=$SEND_RECORDS [rerun]=$RECORDS [hash-floor]=$RECORDS [wc]=$RECORDS)
declare -A MED_SECS=() MED_RATE=() RATIO=() RATIO_TO=() NOTE=()
for s in "${SCENARIOS[@]}"; do
    # shellcheck disable=SC2086 # word splitting intended
    MED_SECS[$s]=$(median ${SECS[$s]})
    # shellcheck disable=SC2086
    MED_RATE[$s]=$(median ${RATE[$s]})
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.3f", a / b }'; }
RATIO[setup]=$(ratio "${MED_RATE[setup]}" "${MED_RATE[bare]}") RATIO_TO[setup]=bare
RATIO[send]=$(ratio "${MED_RATE[send]}" "${MED_RATE[bare]}") RATIO_TO[send]=bare
RATIO[rerun]=$(ratio "${MED_RATE[rerun]}" "${MED_RATE[hash-floor]}") RATIO_TO[rerun]=hash-floor
RATIO[wc]=$(ratio "${MED_RATE[wc]}" "${MED_RATE[hash-floor]}") RATIO_TO[wc]=hash-floor
if awk -v r="${RATIO[send]}" -v g="$GOAL_SEND" 'BEGIN { exit !(r >= g) }'; then
    NOTE[send]="goal >= ${GOAL_SEND}x bare: met"
else
    NOTE[send]="goal >= ${GOAL_SEND}x bare: NOT MET"
fi
if awk -v r="${MED_RATE[rerun]}" -v g="$GOAL_RERUN" 'BEGIN { exit !(r >= g) }'; then
    NOTE[rerun]="goal >= $GOAL_RERUN/s: met"
else
    NOTE[rerun]="goal >= $GOAL_RERUN/s: NOT MET"
fi

echo
echo "idem run benchmark — $STARTED_AT, commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "one POST step, key_strategy=primary_key, concurrency $CONCURRENCY, records of $((RECORD_BYTES / RECORDS)) B;" \
    "median of $RUNS round(s); $NPROC cores shared with the upstream nginx; load average $LOAD_START at start, $LOAD_END at end"
echo
printf '%-36s %-18s %9s %9s %11s %8s  %s\n' scenario store records seconds records/s ratio ""
printf '%-36s %-18s %9s %9s %11s %8s  %s\n' "------------------------------------" "------------------" "---------" "---------" "-----------" "--------" ""
for s in "${SCENARIOS[@]}"; do
    r=${RATIO[$s]:-}
    [[ -n $r ]] && r="${r}x ${RATIO_TO[$s]}"
    printf '%-36s %-18s %9d %9.3f %11.0f %8s  %s\n' "${LABEL[$s]}" "${STORE_OF[$s]:--}" "${N_OF[$s]}" \
        "${MED_SECS[$s]}" "${MED_RATE[$s]}" "${RATIO[$s]:+${RATIO[$s]}x}" "${RATIO_TO[$s]:+(to ${RATIO_TO[$s]})}${NOTE[$s]:+  ${NOTE[$s]}}"
done
echo
echo "the re-run store after the setup: $((RERUN_DB_BYTES / 1048576)) MiB for $RECORDS records ($TMP_FS)"
if [[ -n $PERF_TOP ]]; then
    echo
    echo "perf record -g of the last send and the last re-run ($PERF_FILES):"
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
OUT_FILE=$OUT_DIR/runner-$(date -u +%Y%m%dT%H%M%SZ).json
{
    printf '{\n'
    printf '  "benchmark": "idem run: re-run of records already sent, send rate vs a bare client loop",\n'
    printf '  "started_at": %s,\n' "$(json_string "$STARTED_AT")"
    printf '  "commit": %s,\n' "$(json_string "$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)")"
    printf '  "worktree_dirty": %s,\n' "$([[ -n $(git -C "$ROOT" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null) ]] && echo true || echo false)"
    printf '  "host": {"cores": %s, "kernel": %s, "loadavg_start": %s, "loadavg_end": %s, "tmp_fs": %s},\n' \
        "$NPROC" "$(json_string "$(uname -r)")" "$(json_string "$LOAD_START")" "$(json_string "$LOAD_END")" "$(json_string "$TMP_FS")"
    printf '  "tools": {"nginx": %s},\n' "$(json_string "$("$NGINX" -v 2>&1 | head -1)")"
    printf '  "settings": {"records": %s, "send_records": %s, "concurrency": %s, "runs": %s, "send_store_sync": %s, "rerun_store_sync": %s, "record_bytes": %s, "sample_record": %s, "key_strategy": "primary_key"},\n' \
        "$RECORDS" "$SEND_RECORDS" "$CONCURRENCY" "$RUNS" "$(json_string "$SEND_STORE_SYNC")" \
        "$(json_string "$RERUN_STORE_SYNC")" "$RECORD_BYTES" "$(json_string "$SAMPLE_RECORD")"
    printf '  "goals": {"send_vs_bare": %s, "rerun_records_per_s": %s},\n' "$GOAL_SEND" "$GOAL_RERUN"
    printf '  "rerun_store_bytes": %s,\n' "$RERUN_DB_BYTES"
    printf '  "scenarios": [\n'
    sep=""
    for s in "${SCENARIOS[@]}"; do
        printf '%s    {"name": %s, "label": %s, "store": %s, "records": %s, "seconds": %s, "records_per_s": %s, "ratio": %s, "ratio_to": %s, "note": %s,\n' \
            "$sep" "$(json_string "$s")" "$(json_string "${LABEL[$s]}")" "$(json_string "${STORE_OF[$s]:-}")" \
            "${N_OF[$s]}" "${MED_SECS[$s]}" "${MED_RATE[$s]}" "${RATIO[$s]:-null}" \
            "$(json_string "${RATIO_TO[$s]:-}")" "$(json_string "${NOTE[$s]:-}")"
        printf '     "runs": [%s]}' "${RUNLOG[$s]%,}"
        sep=$',\n'
    done
    printf '\n  ],\n'
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
