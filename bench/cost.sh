#!/usr/bin/env bash
# bench/cost.sh — the cost model of `idem gateway`: what one request costs, by part, in
# measures that do not depend on how busy the machine is.
#
# A benchmark, not a test: it prints numbers and fails only when it could not measure (a
# process died, an answer was not 201).
#
# What runs, on 127.0.0.1 in a temporary directory removed on exit (kept with KEEP_TMP=1
# or when the run fails): the nginx upstream of bench/gateway.sh (answers every request
# `201 {"id":"x"}`), and `idem gateway` in front of it with its zero-config default route,
# once per store in STORES:
#   sqlite     sqlite://…/idem.db (durable: synchronous=full, the default)
#   memory     memory://
#   redis      REDIS_URL (default redis://127.0.0.1:6379), a fresh key prefix per run
#   postgres   POSTGRES_URL (default postgres://root@127.0.0.1:5432/test), a fresh schema
# Each store gets the same fixed request mix, one mode after the other: N misses (a new
# Idempotency-Key each), N replays (one key, primed first) and N pass-throughs (no key),
# POST /v1/orders with the JSON body of bench/gateway.sh, over CONNECTIONS kept-alive
# connections (bench/cost_client.py), after WARM requests of each mode.
#
# Two measures per store and mode:
#   instructions/request  the gateway under `valgrind --tool=callgrind` (every thread):
#                         counters zeroed before a mode's requests, dumped after them
#                         (callgrind_control), divided by N. Deterministic to a few per
#                         cent (thread interleaving and group-commit sizes vary), so it
#                         is the before/after figure of every change. User space only:
#                         the kernel's share (syscalls, the network stack, fsync) is not
#                         in it; the CPU time below has it.
#                         Broken down by part: callgrind_annotate's inclusive cost of the
#                         functions that own each part (PARTS below), per request. Parts
#                         nest inside "total" but not inside each other, except "alloc",
#                         which is the allocator's share of all of them.
#   CPU-µs/request        the gateway run natively: utime+stime from /proc/PID/stat over
#                         the mode's requests, and the store server's own (redis-server,
#                         every postgres process) for Redis and PostgreSQL. Wall-clock
#                         noise moves it a little (caches, migrations); instructions don't.
#                         Beside it, the gateway's context switches per request (every
#                         thread's voluntary + involuntary, /proc/PID/task/*/status): how
#                         often a request's work hands over between threads and sleeps.
#   syscalls/request      the gateway under `strace -c -f` (SYSCALLS=1): every thread's
#                         system calls over SYSCALL_N requests of a mode, by call, divided
#                         by SYSCALL_N. strace slows the gateway, so the counts (which
#                         wake-ups happen) move with timing a little; the calls a request
#                         makes (reads, writes, fsync) do not.
#
# Usage:
#   bench/cost.sh                                # every store, N=400
#   STORES=sqlite N=200 bench/cost.sh            # a quick look at one store
#   CALLGRIND=0 bench/cost.sh                    # CPU time only (fast)
#
# Environment:
#   STORES="sqlite memory redis postgres"   MODES="miss replay passthrough"
#   N=400  WARM=50  CONNECTIONS=8
#   NATIVE_N=4000                requests per mode for the CPU time (its clock ticks are 10 ms)
#   SYSCALL_N=1000               requests per mode under strace
#   CALLGRIND=1  NATIVE=1  SYSCALLS=1   which measures to take
#   PROFILE=release              the cargo profile built (bench-fast: no LTO, for
#                                iterating; final figures come from release)
#   IDEM_BIN=path                use this binary, no build; SKIP_BUILD=1 skips it too
#   KEEP_TMP=1                   keep logs and callgrind files
#   REDIS_URL, POSTGRES_URL      the shared servers
#
# Needs: bash, curl, python3, nginx, valgrind and strace (installed with apt-get when
# missing), cargo.

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)

STORES=${STORES:-"sqlite memory redis postgres"}
MODES=${MODES:-"miss replay passthrough"}
N=${N:-400}
NATIVE_N=${NATIVE_N:-4000}
WARM=${WARM:-50}
CONNECTIONS=${CONNECTIONS:-8}
CALLGRIND=${CALLGRIND:-1}
NATIVE=${NATIVE:-1}
SYSCALLS=${SYSCALLS:-1}
SYSCALL_N=${SYSCALL_N:-1000}
PROFILE=${PROFILE:-release}
KEEP_TMP=${KEEP_TMP:-0}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
POSTGRES_URL=${POSTGRES_URL:-postgres://root@127.0.0.1:5432/test}
BODY='{"amount":4200,"currency":"EUR","customer":"cus_42","note":"bench"}'
REQ_PATH=/v1/orders

SCRIPT=cost.sh
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"

# The parts of a request: each the inclusive cost of the functions whose names match its
# extended regular expression, summed (a function's cost is summed over the source files
# callgrind splits it into, inlined code included). The patterns name functions that do not
# call one another, so no part counts a cost twice; "alloc" and "memcpy" are leaves, inside
# the other parts. "rest" is the total less the other parts: the runtime's scheduling, the
# hyper connections' I/O (the upstream connection's task is inlined into tokio's poll and
# has no name of its own), timers, metrics.
PARTS=(
    "http parse+encode|^<hyper::proto::h1::role::Server as hyper::proto::h1::Http1Transaction>::(parse|encode)$"
    "identify+fingerprint|^idem::layer::identify::identify$"
    "store claim|^<idem::store::[a-z]+::[A-Za-z]+ as idem::store::Store>::claim::[{][{]closure[}][}]$"
    "store finish|^<idem::store::[a-z]+::[A-Za-z]+ as idem::store::Store>::finish::[{][{]closure[}][}]$"
    "sqlite writer|^idem::store::sqlite::write_loop$"
    "store client conn|^<redis::aio::multiplexed_connection::PipelineSink<T> as futures_sink::Sink<redis::aio::multiplexed_connection::PipelineMessage>>::|^<redis::aio::multiplexed_connection::PipelineSink<T> as futures_sink::Sink<.*>>::|^<tokio_postgres::connection::Connection<S,T> as core::future::future::Future>::poll$"
    "upstream call|^<idem::gateway::proxy::Proxy as tower_service::Service<.*>>::call::[{][{]closure[}][}]$"
    "answer|^idem::layer::answer::(answered|replay|with_expiry|accepted)$"
    "task spawn|^tokio::task::spawn::spawn$"
    "memcpy|^__(memcpy|memmove)_avx_unaligned(_erms)?$"
    "alloc|^(malloc|free|realloc|calloc|posix_memalign|aligned_alloc|mi_malloc_aligned|mi_zalloc_aligned|mi_realloc_aligned|mi_free|mi_malloc|mi_realloc|mi_zalloc|mi_calloc)$"
)

[[ $N =~ ^[1-9][0-9]*$ ]] || die "N must be a positive integer (got '$N')"
[[ $WARM =~ ^[0-9]+$ ]] || die "WARM must be a number (got '$WARM')"
[[ $CONNECTIONS =~ ^[1-9][0-9]*$ ]] || die "CONNECTIONS must be a positive integer (got '$CONNECTIONS')"
for s in $STORES; do
    [[ " sqlite memory redis postgres " == *" $s "* ]] || die "unknown store '$s' (known: sqlite memory redis postgres)"
done
for m in $MODES; do
    [[ " miss replay passthrough " == *" $m "* ]] || die "unknown mode '$m' (known: miss replay passthrough)"
done

need_packages nginx curl python3
((CALLGRIND)) && need_packages valgrind
((SYSCALLS)) && need_packages strace

if [[ -n ${IDEM_BIN:-} ]]; then
    [[ -x $IDEM_BIN ]] || die "IDEM_BIN=$IDEM_BIN is not an executable"
else
    dir=$PROFILE
    [[ $PROFILE == dev ]] && dir=debug
    if [[ ${SKIP_BUILD:-0} != 1 ]]; then
        log "building: cargo build --profile $PROFILE --locked --bin idem"
        (cd "$ROOT" && cargo build --profile "$PROFILE" --locked --bin idem) >&2
    fi
    IDEM_BIN=$(cargo_target_dir)/$dir/idem
    [[ -x $IDEM_BIN ]] || die "$IDEM_BIN does not exist"
fi

make_tmp idem-cost "logs and callgrind files"
RUN_ID=cost_$(date +%s)_$$
extra_cleanup() {
    if [[ " $STORES " == *" postgres "* ]] && command -v psql >/dev/null; then
        psql "$POSTGRES_URL" -q -c "DROP SCHEMA IF EXISTS idem_$RUN_ID CASCADE" >/dev/null 2>&1 || true
    fi
    if [[ " $STORES " == *" redis "* ]] && command -v redis-cli >/dev/null; then
        redis-cli -u "$REDIS_URL" --scan --pattern "idem_$RUN_ID*" 2>/dev/null |
            xargs -r -d "\n" -n 500 redis-cli -u "$REDIS_URL" del >/dev/null 2>&1 || true
    fi
}

start_nginx_upstream

store_url() {
    case $1 in
    sqlite) echo "sqlite://$TMP/idem-$2.db" ;;
    memory) echo "memory://" ;;
    redis) echo "$REDIS_URL?prefix=idem_${RUN_ID}_$2" ;;
    postgres) echo "$POSTGRES_URL?schema=idem_$RUN_ID" ;;
    esac
}


# context_switches PID: the voluntary and involuntary context switches of every thread
# of PID, summed (threads that have exited are not counted).
context_switches() {
    cat /proc/"$1"/task/*/status 2>/dev/null |
        awk '/^(non)?voluntary_ctxt_switches:/ { s += $2 } END { print s + 0 }'
}

server_pids() { store_server_pids "$1" "$REDIS_URL"; }

# mix URL MODE TAG COUNT: COUNT requests of MODE; the replay key is TAG.
mix() {
    local url=$1 mode=$2 tag=$3 count=$4 client_mode
    case $mode in
    miss) client_mode=unique ;;
    replay) client_mode=fixed ;;
    passthrough) client_mode=none ;;
    esac
    python3 "$HERE/cost_client.py" "$url$REQ_PATH" "$client_mode" "$tag" "$count" "$CONNECTIONS" "$BODY" ||
        die "the $mode requests to $url failed"
}

# start_idem NAME STORE_URL [WRAPPER...]: the gateway, possibly under a wrapper; sets GW_URL
# and GW_PID (the wrapper's pid, which is the gateway's: valgrind runs it in-process).
start_idem() {
    local name=$1 store=$2 port admin
    shift 2
    free_port port
    free_port admin
    start "$name" "$@" "$IDEM_BIN" gateway --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
        --upstream "$UPSTREAM_URL" --store "$store"
    GW_PID=$LAST_PID
    GW_URL=http://127.0.0.1:$port
    for _ in $(seq 1200); do
        kill -0 "$GW_PID" 2>/dev/null || { show_logs "$name"; die "$name exited during startup"; }
        grep -q 'listening on' "$TMP/$name.out" 2>/dev/null && return 0
        sleep 0.1
    done
    show_logs "$name"
    die "$name printed no ready line within 120 s"
}

stop_idem() {
    kill -TERM "$GW_PID" 2>/dev/null || true
    for _ in $(seq 300); do
        kill -0 "$GW_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$GW_PID" 2>/dev/null || true
    wait "$GW_PID" 2>/dev/null || true
    forget_pid "$GW_PID"
}

# run_mode URL MODE TAG COUNT: COUNT requests of MODE, keys made from TAG; the replays all
# use the key that prime_replay URL TAG stored (TAG-replay-0-0).
run_mode() {
    if [[ $2 == replay ]]; then mix "$1" replay "$3-replay-0-0" "$4"; else mix "$1" "$2" "$3-$2" "$4"; fi
}
prime_replay() { # URL TAG
    [[ " $MODES " == *" replay "* ]] || return 0
    mix "$1" miss "$2-replay" 1
}
warm_up() { # URL TAG
    local mode
    ((WARM > 0)) || return 0
    for mode in $MODES; do run_mode "$1" "$mode" "$2-warm" "$WARM"; done
}

declare -A CPU_US=() SERVER_US=() SWITCHES=() INSTR=() PART=() SYSCALL=() SYSCALL_TOP=()

native_pass() { # STORE
    local store=$1 pids t0 t1 c0 c1 s0 s1 mode tag=n-$RUN_ID-$1
    start_idem "native-$store" "$(store_url "$store" native)"
    prime_replay "$GW_URL" "$tag"
    prime_replay "$GW_URL" "$tag-warm"
    warm_up "$GW_URL" "$tag"
    for mode in $MODES; do
        pids=$(server_pids "$store")
        t0=$(cpu_ticks "$GW_PID")
        c0=$(context_switches "$GW_PID")
        # shellcheck disable=SC2086 # a list of pids
        s0=$(cpu_ticks $pids)
        run_mode "$GW_URL" "$mode" "$tag" "$NATIVE_N"
        t1=$(cpu_ticks "$GW_PID")
        c1=$(context_switches "$GW_PID")
        SWITCHES[$store.$mode]=$(awk -v d=$((c1 - c0)) -v n="$NATIVE_N" 'BEGIN{printf "%.2f", d/n}')
        # shellcheck disable=SC2086
        s1=$(cpu_ticks $(server_pids "$store"))
        CPU_US[$store.$mode]=$(awk -v d=$((t1 - t0)) -v t="$TICK" -v n="$NATIVE_N" 'BEGIN{printf "%.0f", d*1e6/t/n}')
        [[ -n $pids ]] && SERVER_US[$store.$mode]=$(awk -v d=$((s1 - s0)) -v t="$TICK" -v n="$NATIVE_N" 'BEGIN{printf "%.0f", d*1e6/t/n}')
    done
    stop_idem
}

# annotate FILE: the total ("TOTAL<TAB>n"), then "cost<TAB>function" per function, its
# inclusive cost summed over the source files callgrind_annotate lists it under. Run from
# /: from the repository, callgrind_annotate lists some functions twice, under absolute
# and relative paths.
annotate() {
    (cd / && callgrind_annotate --inclusive=yes --threshold=100 --auto=no "$1" 2>/dev/null) |
        awk '/PROGRAM TOTALS/ { c = $1; gsub(",", "", c); print "TOTAL\t" c; next }
             /file:function/ { list = 1; next }
             list && /^$/ { if (seen) list = 0; next }
             list && /^ *[0-9,]+ \(/ {
                 seen = 1; c = $1; gsub(",", "", c); f = $0
                 sub(/^ *[0-9,]+ \([^)]*\) +/, "", f); sub(/^[^:]*:/, "", f); sub(/ \[[^]]*\]$/, "", f)
                 sum[f] += c
             }
             END { for (f in sum) print sum[f] "\t" f }'
}

callgrind_pass() { # STORE
    local store=$1 mode tag=c-$RUN_ID-$1 before file out part name pattern
    start_idem "callgrind-$store" "$(store_url "$store" callgrind)" \
        valgrind --tool=callgrind --callgrind-out-file="$TMP/callgrind.$store.%p" --collect-systime=no
    prime_replay "$GW_URL" "$tag"
    prime_replay "$GW_URL" "$tag-warm"
    warm_up "$GW_URL" "$tag"
    for mode in $MODES; do
        callgrind_control --zero "$GW_PID" >/dev/null 2>&1
        run_mode "$GW_URL" "$mode" "$tag" "$N"
        before=$(ls "$TMP"/callgrind."$store".* 2>/dev/null | wc -l)
        callgrind_control --dump="$mode" "$GW_PID" >/dev/null 2>&1
        for _ in $(seq 600); do
            (($(ls "$TMP"/callgrind."$store".* 2>/dev/null | wc -l) > before)) && break
            sleep 0.1
        done
        file=$(ls -t "$TMP"/callgrind."$store".* | head -1)
        out=$TMP/annotate.$store.$mode
        annotate "$file" >"$out"
        INSTR[$store.$mode]=$(awk -F '\t' -v n="$N" '$1 == "TOTAL" { printf "%.0f", $2 / n }' "$out")
        for part in "${PARTS[@]}"; do
            name=${part%%|*}
            pattern=${part#*|}
            PART[$store.$mode.$name]=$(awk -F '\t' -v n="$N" -v re="$pattern" \
                '$1 != "TOTAL" && $2 ~ re { m += $1 } END { printf "%.0f", m / n }' "$out")
        done
    done
    stop_idem
}

# syscall_pass STORE: each mode's SYSCALL_N requests with strace -c attached to every thread
# of the gateway; SYSCALL[store.mode] = calls per request, SYSCALL_TOP[store.mode] = the
# calls made at least 0.05 times a request, most frequent first ("name n.nn, …").
syscall_pass() {
    local store=$1 mode tag=s-$RUN_ID-$1 out strace_pid
    start_idem "syscalls-$store" "$(store_url "$store" syscalls)"
    prime_replay "$GW_URL" "$tag"
    prime_replay "$GW_URL" "$tag-warm"
    warm_up "$GW_URL" "$tag"
    for mode in $MODES; do
        out=$TMP/strace.$store.$mode
        strace -c -f -q -o "$out" -p "$GW_PID" 2>"$TMP/strace.$store.$mode.err" &
        strace_pid=$!
        sleep 1 # strace attaches to each thread
        run_mode "$GW_URL" "$mode" "$tag" "$SYSCALL_N"
        kill -INT "$strace_pid"
        wait "$strace_pid" 2>/dev/null || true
        [[ -s $out ]] || die "strace wrote nothing for $store $mode (see $TMP/strace.$store.$mode.err)"
        # The summary's rows: % time, seconds, usecs/call, calls, [errors,] syscall; the
        # calls are the fourth column either way.
        SYSCALL[$store.$mode]=$(awk -v n="$SYSCALL_N" '$NF == "total" { printf "%.1f", $4 / n }' "$out")
        SYSCALL_TOP[$store.$mode]=$(awk -v n="$SYSCALL_N" '
            /^-/ || /^ *%/ || $NF == "total" || NF < 5 { next }
            $4 / n >= 0.05 { printf "%s %.2f\n", $NF, $4 / n }' "$out" |
            sort -k2,2 -rn | paste -sd, - | sed 's/,/, /g')
    done
    stop_idem
}

STARTED_AT=$(date -u +%FT%TZ)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
for store in $STORES; do
    ((NATIVE)) && { log "native: $store"; native_pass "$store"; }
    ((CALLGRIND)) && { log "callgrind: $store"; callgrind_pass "$store"; }
    ((SYSCALLS)) && { log "syscalls: $store"; syscall_pass "$store"; }
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

echo
measures=()
((CALLGRIND)) && measures+=("$N requests under callgrind")
((NATIVE)) && measures+=("$NATIVE_N natively")
((SYSCALLS)) && measures+=("$SYSCALL_N under strace")
echo "idem gateway cost model — per mode $(printf '%s, ' "${measures[@]}")over $CONNECTIONS connections, after $WARM of each"
echo "binary: $IDEM_BIN ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')$([[ -n $(git -C "$ROOT" status --porcelain -- src Cargo.toml 2>/dev/null) ]] && echo ', dirty'))"
echo "started $STARTED_AT; load average $LOAD_START at the start, $LOAD_END at the end"
echo
if ((NATIVE)); then
    printf '%-10s %-12s %16s %20s %22s\n' store mode "CPU-µs/request" "store server µs/req" "context switches/req"
    for store in $STORES; do
        for mode in $MODES; do
            printf '%-10s %-12s %16s %20s %22s\n' "$store" "$mode" "${CPU_US[$store.$mode]}" \
                "${SERVER_US[$store.$mode]:--}" "${SWITCHES[$store.$mode]}"
        done
    done
    echo
fi
if ((SYSCALLS)); then
    echo "system calls per request (every thread of the gateway, strace -c over $SYSCALL_N requests):"
    for store in $STORES; do
        for mode in $MODES; do
            printf '%-10s %-12s %8s  %s\n' "$store" "$mode" "${SYSCALL[$store.$mode]}" "${SYSCALL_TOP[$store.$mode]}"
        done
    done
    echo
fi
if ((CALLGRIND)); then
    header=$(printf '%-10s %-12s %12s' store mode "instr/req")
    for part in "${PARTS[@]}"; do header+=$(printf ' | %s' "${part%%|*}"); done
    header+=" | rest"
    echo "instructions per request (user space), by part (inclusive; parts do not nest; memcpy and alloc are inside the others):"
    echo "$header"
    for store in $STORES; do
        for mode in $MODES; do
            line=$(printf '%-10s %-12s %12s' "$store" "$mode" "${INSTR[$store.$mode]}")
            rest=${INSTR[$store.$mode]}
            for part in "${PARTS[@]}"; do
                line+=$(printf ' | %s' "${PART[$store.$mode.${part%%|*}]}")
                [[ ${part%%|*} == alloc || ${part%%|*} == memcpy ]] || rest=$((rest - PART[$store.$mode.${part%%|*}]))
            done
            line+=" | $rest"
            echo "$line"
        done
    done
    echo "(callgrind files and callgrind_annotate output: KEEP_TMP=1 keeps $TMP)"
fi
