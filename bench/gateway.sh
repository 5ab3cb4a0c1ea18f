#!/usr/bin/env bash
# bench/gateway.sh — throughput and latency of `idem gateway` against a bare proxy.
#
# A benchmark, not a test: it prints numbers and never fails on them. It exits non-zero
# only when it could not measure (a process died, a setup check failed) or when a run saw
# errors (socket errors, timeouts, or any status other than 201), because those would
# make the ratios meaningless.
#
# What runs, all on 127.0.0.1 with free ports, in a temporary directory that is removed
# on exit with every process this script started (kept, logs and all, when the run fails):
#   upstream   nginx, 1 worker, answers every request `201 {"id":"x"}` without touching
#              the disk (bench/nginx/upstream.conf.in)
#   proxy      nginx as a bare keep-alive reverse proxy in front of it, the baseline
#              (bench/nginx/proxy.conf.in; PROXY_WORKERS, default auto = one per core,
#              like the gateway's tokio runtime)
#   gateway    `idem gateway` in front of the same upstream with its zero-config default
#              route (POST/PATCH protected by an optional Idempotency-Key), once per
#              store: sqlite://…/idem.db (durable, synchronous=full, the default),
#              sqlite://…/idem2.db?synchronous=normal, and memory://
# and, only for the TLS scenarios (*-tls), with a private CA and a server certificate for
# localhost and 127.0.0.1 made by openssl in the temporary directory (bench/lib.sh
# make_test_ca):
#   upstream-tls the same upstream over HTTPS, 1 worker, HTTP/1.1, and HTTP/2 offered by
#              ALPN too when nginx has `http2 on;` (1.25.1 and later; UPSTREAM_TLS_HTTP2)
#              (bench/nginx/upstream-tls.conf.in)
#   proxy-tls  nginx as a bare keep-alive reverse proxy in front of it, the TLS baseline:
#              proxy_pass https:// with the chain verified against the CA, name localhost
#              (and SNI), sessions reused, 64 kept-alive upstream connections, HTTP/1.1
#              (bench/nginx/proxy-tls.conf.in; PROXY_WORKERS like the proxy)
#   gw-tls     `idem gateway --upstream https://localhost:PORT` on its own durable SQLite
#              store (sqlite://…/idem-tls.db), trusting the CA through SSL_CERT_FILE
#              (rustls, verified; HTTP/2 when the upstream offers it)
# Clients (wrk) always speak plain HTTP/1.1 to the proxies and gateways: only the hop to
# the upstream is TLS. The protocol and cipher each TLS hop negotiated are printed (the
# upstream echoes them in an X-Bench-Upstream header) and recorded in the JSON.
#
# Scenarios (SCENARIOS picks and orders them; the default is the first six):
#   upstream        wrk → upstream
#   proxy           wrk → nginx proxy → upstream                       (the baseline)
#   miss            wrk → gateway (sqlite, full) → upstream; a new key per request
#   replay          wrk → gateway (sqlite, full); one key, primed once with curl
#   miss-normal     the miss path on sqlite with synchronous=normal
#   miss-memory     the miss path on memory:// (no durability at all)
#   replay-normal   the replay path on sqlite with synchronous=normal   (optional)
#   replay-memory   the replay path on memory://                        (optional)
#   miss-postgres   the miss path on PostgreSQL (POSTGRES_URL, a fresh schema per run)  (optional)
#   replay-postgres the replay path on PostgreSQL                                    (optional)
#   miss-redis      the miss path on Redis (REDIS_URL, a fresh key prefix per run)     (optional)
#   replay-redis    the replay path on Redis                                         (optional)
#   passthrough     wrk → gateway (sqlite, full) → upstream without an Idempotency-Key:
#                   the gateway's own cost (body read, fingerprint, proxying) with no
#                   store call                                             (optional)
#   upstream-tls    wrk → HTTPS upstream (HTTP/1.1; wrk pays for TLS itself here, so
#                   this row says more about wrk than about the upstream)  (optional)
#   proxy-tls       wrk → nginx proxy → HTTPS upstream          (the TLS baseline, optional)
#   miss-tls        wrk → gateway (sqlite, full) → HTTPS upstream; a new key per request
#                                                                          (optional)
#   replay-tls      wrk → gateway (sqlite, full, HTTPS upstream); one key, primed once:
#                   a replay never reaches the upstream, so this is `replay` with TLS
#                   configured but unused                                  (optional)
# Every request is `POST /v1/orders` with a small JSON body, Content-Type
# application/json, an Idempotency-Key and a unique X-Bench-Seq header, built per
# request by bench/wrk/post.lua in every scenario so that wrk's own cost is identical in
# every row. The upstream and the proxy ignore the key headers.
#
# Load: wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency, RUNS rounds. Each round runs
# every scenario once, in turn, so background noise spreads over all rows alike. A row
# reports the median req/s, the median p50 and the median p99 over its runs, the median
# CPU time the server under test spent per answered request (user + system, every thread
# or worker process, from /proc: what a request costs it under load) and the upstream
# nginx's, the Redis or PostgreSQL server's and wrk's, and its
# req/s as a ratio to its baseline's: the *-tls rows to proxy-tls, every other row to
# proxy (the table's "base" column says which; the JSON also has every row's ratio to
# proxy, and the TLS rows' ratio to their plaintext twin: the cost of TLS). Design goals
# (issue 15): miss path >= 0.55x the bare proxy on the durable SQLite store, replay
# >= 1.5x; on Redis miss >= 0.45x, replay >= 0.9x; PostgreSQL miss >= 0.25x (no goal for
# the TLS rows). bench/cost.sh explains the figures: instructions per request by part. Every gateway run is
# cross-checked against the gateway's own idem_requests_total{decision}: a miss run must
# count only `executed`, a replay run only `replayed`.
#
# THE MACHINE MATTERS. The reference machine has 2 cores, and wrk, the upstream nginx,
# the proxy or the gateway all share them: numbers are a comparison between rows of the
# same run, not an absolute capacity. The load generator costs as much CPU as the thing
# measured, which compresses ratios towards 1. Anything else busy on the machine (a
# compile) makes the numbers noisy; the load average is recorded per run. The SQLite
# files live in the temporary directory, so its filesystem decides what an fsync costs
# (the script prints it and warns on tmpfs, where "durable" costs nothing).
#
# Default run time: 6 scenarios x 3 runs x 10 s of load + 6 s warm-up + setup: about 3 min 10 s.
#
# Usage:
#   bench/gateway.sh                                  # defaults
#   DURATION=5s RUNS=1 bench/gateway.sh               # a quick look
#   SCENARIOS="proxy miss replay" bench/gateway.sh    # a subset (ratios need "proxy")
#   SCENARIOS="proxy passthrough miss-memory replay-memory" bench/gateway.sh
#                                                     # where the time goes, store aside
#   SCENARIOS="proxy proxy-tls miss miss-tls replay replay-tls" bench/gateway.sh
#                                                     # the cost of an HTTPS upstream
#
# Environment:
#   DURATION=10s  RUNS=3  CONNECTIONS=64  THREADS=1   wrk settings
#   WARMUP=1s           one discarded wrk run per scenario before the first round (0 skips)
#   SCENARIOS="upstream proxy miss replay miss-normal miss-memory"
#   PROXY_WORKERS=auto  nginx proxy worker_processes (proxy and proxy-tls)
#   UPSTREAM_TLS_HTTP2=auto  offer h2 on the HTTPS upstream when nginx has http_v2_module
#                       and `http2 on;` (1.25.1+); 1 offers it on older nginx too (`listen
#                       … http2`); 0 never (HTTP/1.1 only, what the nginx proxy speaks anyway).
#                       (nginx 1.22 answers 400, "duplicate host header", to an HTTP/2 request
#                       with a Host header beside :authority; idem sent one before 023b86a,
#                       and the check below names that cause if it reappears.)
#   IDEM_BIN=path       use this binary and skip the build; SKIP_BUILD=1 skips it too
#                       (the binary is $CARGO_TARGET_DIR/release/idem, default target/)
#   BENCH_TMPDIR=dir    where the temporary directory goes (default $TMPDIR or /tmp)
#   KEEP_TMP=1          keep the temporary directory (logs, databases) after the run
#   OUT_DIR=dir         where the JSON goes (default bench/out, git-ignored)
#
# Needs: bash, curl, wrk and nginx (installed with apt-get when missing), cargo; openssl
# too for the TLS scenarios (installed the same way).

set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)

DURATION=${DURATION:-10s}
RUNS=${RUNS:-3}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-1}
WARMUP=${WARMUP:-1s}
SCENARIOS=${SCENARIOS:-"upstream proxy miss replay miss-normal miss-memory"}
PROXY_WORKERS=${PROXY_WORKERS:-auto}
UPSTREAM_TLS_HTTP2=${UPSTREAM_TLS_HTTP2:-auto}
OUT_DIR=${OUT_DIR:-$HERE/out}
KEEP_TMP=${KEEP_TMP:-0}
SKIP_BUILD=${SKIP_BUILD:-0}

BODY='{"amount":4200,"currency":"EUR","customer":"cus_42","note":"bench"}'
REQ_PATH=/v1/orders
EXPECT_STATUS=201
# Design goals, as ratios to the bare proxy (issue 15): the durable SQLite miss path, the
# SQLite replay, and the shared stores' rows.
GOAL_MISS=0.55
GOAL_REPLAY=1.50
GOAL_MISS_REDIS=0.45
GOAL_REPLAY_REDIS=0.90
GOAL_MISS_POSTGRES=0.25

SCRIPT=gateway.sh
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"

# ---------------------------------------------------------------- inputs and tools

[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer (got '$RUNS')"
[[ $CONNECTIONS =~ ^[1-9][0-9]*$ ]] || die "CONNECTIONS must be a positive integer (got '$CONNECTIONS')"
[[ $THREADS =~ ^[1-9][0-9]*$ ]] || die "THREADS must be a positive integer (got '$THREADS')"
((CONNECTIONS >= THREADS)) || die "CONNECTIONS ($CONNECTIONS) must be at least THREADS ($THREADS)"
[[ $DURATION =~ ^[0-9]+[smh]?$ ]] || die "DURATION must look like 10s, 2m or 30 (got '$DURATION')"
[[ $WARMUP =~ ^[0-9]+[smh]?$ ]] || die "WARMUP must look like 1s or 0 (got '$WARMUP')"
[[ $UPSTREAM_TLS_HTTP2 =~ ^(auto|0|1)$ ]] || die "UPSTREAM_TLS_HTTP2 must be auto, 0 or 1 (got '$UPSTREAM_TLS_HTTP2')"

known_scenarios=" upstream proxy miss replay miss-normal miss-memory replay-normal replay-memory passthrough miss-postgres replay-postgres miss-redis replay-redis upstream-tls proxy-tls miss-tls replay-tls "
read -r -a SCENARIO_LIST <<<"$SCENARIOS"
((${#SCENARIO_LIST[@]} > 0)) || die "SCENARIOS is empty"
for s in "${SCENARIO_LIST[@]}"; do
    [[ $known_scenarios == *" $s "* ]] || die "unknown scenario '$s' (known:$known_scenarios)"
done
wants() { [[ " ${SCENARIO_LIST[*]} " == *" $1 "* ]]; }
WANTS_TLS=0
[[ " ${SCENARIO_LIST[*]} " == *"-tls "* ]] && WANTS_TLS=1

need_packages wrk nginx curl
((WANTS_TLS)) && need_packages openssl
NGINX=$(find_nginx)
[[ -n $NGINX ]] || die "nginx not found after installing it"
command -v wrk >/dev/null 2>&1 || die "wrk not found after installing it"

if [[ -n ${IDEM_BIN:-} ]]; then
    [[ -x $IDEM_BIN ]] || die "IDEM_BIN=$IDEM_BIN is not an executable"
elif [[ $SKIP_BUILD == 1 ]]; then
    IDEM_BIN=$(cargo_target_dir)/release/idem
    [[ -x $IDEM_BIN ]] || die "SKIP_BUILD=1 but $IDEM_BIN does not exist"
else
    release_build
    IDEM_BIN=$(cargo_target_dir)/release/idem
fi

# ---------------------------------------------------------------- processes and cleanup

make_tmp idem-bench

# Records the run left in the shared stores (best effort: needs psql / redis-cli).
extra_cleanup() {
    [[ -n ${BENCH_ID:-} ]] || return 0
    if [[ -n ${URL[gw-postgres]:-} ]] && command -v psql >/dev/null; then
        psql "${POSTGRES_URL:-postgres://root@127.0.0.1:5432/test}" -q -c "DROP SCHEMA IF EXISTS idem_$BENCH_ID CASCADE" \
            >/dev/null 2>&1 || true
    fi
    if [[ -n ${URL[gw-redis]:-} ]] && command -v redis-cli >/dev/null; then
        redis-cli -u "${REDIS_URL:-redis://127.0.0.1:6379}" --scan --pattern "idem_$BENCH_ID*" 2>/dev/null |
            xargs -r -d "\n" -n 500 redis-cli -u "${REDIS_URL:-redis://127.0.0.1:6379}" del >/dev/null 2>&1 || true
    fi
}

all_alive() {
    local i
    for i in "${!PIDS[@]}"; do
        if ! kill -0 "${PIDS[i]}" 2>/dev/null; then
            show_logs "${PID_NAMES[i]}"
            die "${PID_NAMES[i]} (pid ${PIDS[i]}) died during the benchmark"
        fi
    done
}

# ---------------------------------------------------------------- start everything

NONCE="$(date -u +%Y%m%dT%H%M%S)-$$-$RANDOM"
STARTED_AT=$(date -u +%Y-%m-%dT%H:%M:%SZ)
TMP_FS=$(stat -f -c %T "$TMP" 2>/dev/null || echo unknown)
NPROC=$(nproc 2>/dev/null || echo '?')
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')

log "idem gateway benchmark: DURATION=$DURATION RUNS=$RUNS CONNECTIONS=$CONNECTIONS THREADS=$THREADS"
log "  scenarios: ${SCENARIO_LIST[*]}"
log "  $NPROC cores shared by wrk, nginx and the gateway; load average now $LOAD_START"
log "  temporary directory $TMP on $TMP_FS"
if [[ $TMP_FS == tmpfs || $TMP_FS == ramfs ]]; then
    log "  WARNING: $TMP is on $TMP_FS: fsync is free there, so the durable SQLite rows cost less than on a disk."
    log "           Set BENCH_TMPDIR to a directory on a real disk for honest durable numbers."
fi
log "  idem binary $IDEM_BIN"

start_nginx_upstream

declare -A URL=() ADMIN=()
URL[upstream]=$UPSTREAM_URL

if wants proxy; then
    free_port PROXY_PORT
    render "$HERE/nginx/proxy.conf.in" "$TMP/proxy.conf" "TMP=$TMP" "PORT=$PROXY_PORT" \
        "UPSTREAM_PORT=$UPSTREAM_PORT" "WORKERS=$PROXY_WORKERS"
    start proxy "$NGINX" -p "$TMP/" -c "$TMP/proxy.conf" -e "$TMP/proxy.error.log"
    wait_port proxy "$PROXY_PORT"
    URL[proxy]=http://127.0.0.1:$PROXY_PORT
fi

# The HTTPS upstream, its CA (trusted by curl, the TLS proxy and the TLS gateway) and the
# TLS proxy, only when a TLS scenario runs.
TLS_CA="" TLS_HTTP2=no
if ((WANTS_TLS)); then
    make_test_ca "$TMP/tls"
    TLS_CA=$TMP/tls/ca.pem
    http2_listen="" http2_directive=""
    nginx_version=$("$NGINX" -v 2>&1 | sed -n 's#.*nginx/\([0-9][0-9.]*\).*#\1#p')
    # `http2 on;` exists from nginx 1.25.1 on (and deprecates `listen … http2`).
    http2_on=0
    [[ $(printf '%s\n' 1.25.1 "$nginx_version" | sort -V | head -1) == 1.25.1 ]] && http2_on=1
    if [[ $UPSTREAM_TLS_HTTP2 == 1 || ($UPSTREAM_TLS_HTTP2 == auto && $http2_on == 1) ]]; then
        "$NGINX" -V 2>&1 | grep -q -- --with-http_v2_module || die "UPSTREAM_TLS_HTTP2=$UPSTREAM_TLS_HTTP2 but this nginx has no http_v2_module"
        TLS_HTTP2=yes
        if ((http2_on)); then http2_directive="http2 on;"; else http2_listen=" http2"; fi
    fi
    free_port UPSTREAM_TLS_PORT
    render "$HERE/nginx/upstream-tls.conf.in" "$TMP/upstream-tls.conf" "TMP=$TMP" "PORT=$UPSTREAM_TLS_PORT" \
        "CERT=$TMP/tls/server.pem" "KEY=$TMP/tls/server.key" "HTTP2_LISTEN=$http2_listen" \
        "HTTP2_DIRECTIVE=$http2_directive"
    start upstream-tls "$NGINX" -p "$TMP/" -c "$TMP/upstream-tls.conf" -e "$TMP/upstream-tls.error.log"
    wait_port upstream-tls "$UPSTREAM_TLS_PORT"
    # The name the certificate is for: the gateway and the proxy both verify it.
    UPSTREAM_TLS_URL=https://localhost:$UPSTREAM_TLS_PORT
    URL[upstream-tls]=$UPSTREAM_TLS_URL
    log "  HTTPS upstream $UPSTREAM_TLS_URL (nginx $nginx_version; h2 offered by ALPN: $TLS_HTTP2" \
        "(UPSTREAM_TLS_HTTP2=$UPSTREAM_TLS_HTTP2)), private CA $TLS_CA"
fi

if wants proxy-tls; then
    free_port PROXY_TLS_PORT
    render "$HERE/nginx/proxy-tls.conf.in" "$TMP/proxy-tls.conf" "TMP=$TMP" "PORT=$PROXY_TLS_PORT" \
        "UPSTREAM_PORT=$UPSTREAM_TLS_PORT" "WORKERS=$PROXY_WORKERS" "CA=$TLS_CA"
    start proxy-tls "$NGINX" -p "$TMP/" -c "$TMP/proxy-tls.conf" -e "$TMP/proxy-tls.error.log"
    wait_port proxy-tls "$PROXY_TLS_PORT"
    URL[proxy-tls]=http://127.0.0.1:$PROXY_TLS_PORT
fi

# start_gateway NAME STORE_URL [UPSTREAM_URL]: the upstream by default the plaintext one;
# an https:// one is trusted through SSL_CERT_FILE (the test CA).
start_gateway() {
    local name=$1 store=$2 upstream=${3:-$UPSTREAM_URL} port admin env=()
    free_port port
    free_port admin
    [[ $upstream == https://* ]] && env=(env "SSL_CERT_FILE=$TLS_CA")
    start "$name" "${env[@]}" "$IDEM_BIN" gateway --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" \
        --upstream "$upstream" --store "$store"
    wait_port "$name" "$port"
    wait_port "$name" "$admin"
    for _ in $(seq 50); do
        grep -q 'listening on' "$TMP/$name.out" && break
        sleep 0.1
    done
    grep -q 'listening on' "$TMP/$name.out" || { show_logs "$name"; die "$name printed no ready line"; }
    URL[$name]=http://127.0.0.1:$port
    ADMIN[$name]=http://127.0.0.1:$admin
}
if wants miss || wants replay || wants passthrough; then start_gateway gw-full "sqlite://$TMP/idem.db"; fi
if wants miss-normal || wants replay-normal; then start_gateway gw-normal "sqlite://$TMP/idem2.db?synchronous=normal"; fi
if wants miss-memory || wants replay-memory; then start_gateway gw-memory "memory://"; fi
if wants miss-tls || wants replay-tls; then start_gateway gw-tls "sqlite://$TMP/idem-tls.db" "$UPSTREAM_TLS_URL"; fi
# The shared stores get a schema / key prefix of their own per run, so runs never see
# each other's records (POSTGRES_URL and REDIS_URL point at the servers).
BENCH_ID=bench_$(date +%s)_$$
if wants miss-postgres || wants replay-postgres; then
    start_gateway gw-postgres "${POSTGRES_URL:-postgres://root@127.0.0.1:5432/test}?schema=idem_$BENCH_ID"
fi
if wants miss-redis || wants replay-redis; then
    start_gateway gw-redis "${REDIS_URL:-redis://127.0.0.1:6379}?prefix=idem_$BENCH_ID"
fi

# scenario → server, key mode, decision the gateway must count, label
declare -A SERVER=([upstream]=upstream [proxy]=proxy [miss]=gw-full [replay]=gw-full
    [miss-normal]=gw-normal [replay-normal]=gw-normal [miss-memory]=gw-memory [replay-memory]=gw-memory
    [passthrough]=gw-full [miss-postgres]=gw-postgres [replay-postgres]=gw-postgres
    [miss-redis]=gw-redis [replay-redis]=gw-redis
    [upstream-tls]=upstream-tls [proxy-tls]=proxy-tls [miss-tls]=gw-tls [replay-tls]=gw-tls)
declare -A LABEL=(
    [upstream]="upstream alone (nginx)"
    [proxy]="bare proxy (nginx)"
    [miss]="gateway miss, sqlite durable"
    [replay]="gateway replay, sqlite durable"
    [miss-normal]="gateway miss, sqlite sync=normal"
    [replay-normal]="gateway replay, sqlite sync=normal"
    [miss-memory]="gateway miss, memory://"
    [replay-memory]="gateway replay, memory://"
    [passthrough]="gateway pass-through, no key"
    [miss-postgres]="gateway miss, postgresql"
    [replay-postgres]="gateway replay, postgresql"
    [miss-redis]="gateway miss, redis"
    [replay-redis]="gateway replay, redis"
    [upstream-tls]="TLS upstream alone (nginx)"
    [proxy-tls]="bare proxy (nginx), TLS upstream"
    [miss-tls]="gateway miss, sqlite, TLS upstream"
    [replay-tls]="gateway replay, sqlite, TLS upstream"
)
mode_of() {
    case $1 in
    replay*) echo fixed ;;
    passthrough) echo none ;;
    *) echo unique ;;
    esac
}
decision_of() {
    case $1 in
    miss*) echo executed ;;
    replay*) echo replayed ;;
    passthrough) echo missing_key ;; # an optional key that is absent: passed through
    *) echo "" ;;
    esac
}
replay_key() { echo "bench-replay-$NONCE"; }
# The row a scenario's ratio is to, and (TLS rows) the plaintext row it is the TLS twin of.
baseline_of() {
    case $1 in
    *-tls) echo proxy-tls ;;
    *) echo proxy ;;
    esac
}
upstream_of() { # SCENARIO → the name of the upstream process behind its server
    case $1 in
    *-tls) echo upstream-tls ;;
    *) echo upstream ;;
    esac
}
plaintext_of() {
    case $1 in
    *-tls) echo "${1%-tls}" ;;
    *) echo "" ;;
    esac
}

# ---------------------------------------------------------------- setup checks

# curl trusts the test CA too (for upstream-tls, the only server wrk reaches over HTTPS).
CURL_TLS=()
[[ -n $TLS_CA ]] && CURL_TLS=(--cacert "$TLS_CA")
post() { # URL KEY [curl args...] → prints the status code
    local url=$1 key=$2
    shift 2
    curl -sS --max-time 10 "${CURL_TLS[@]}" -o /dev/null -w '%{http_code}' -X POST -H 'Content-Type: application/json' \
        -H "Idempotency-Key: $key" --data-binary "$BODY" "$@" "$url$REQ_PATH"
}

# Every server: answers 201 and keeps a connection alive across POSTs with bodies
# (two requests in one curl, the second must not open a connection).
for name in "${!URL[@]}"; do
    url=${URL[$name]}
    code=$(post "$url" "bench-check-$NONCE-$name")
    if [[ $code == 400 && $name == gw-tls && $TLS_HTTP2 == yes ]]; then
        show_logs "$name"
        die "$name answered 400 over HTTP/2: a Host header beside :authority? (older nginx refuses it as" \
            "\"duplicate host header\"); UPSTREAM_TLS_HTTP2=0 measures HTTP/1.1"
    fi
    [[ $code == "$EXPECT_STATUS" ]] || { show_logs "$name"; die "$name answered $code to a POST, not $EXPECT_STATUS"; }
    connects=$(curl -sS --max-time 10 "${CURL_TLS[@]}" -o /dev/null -o /dev/null -w '%{num_connects} ' -X POST \
        -H 'Content-Type: application/json' -H "Idempotency-Key: bench-keepalive-$NONCE-$name" \
        --data-binary "$BODY" "$url$REQ_PATH" "$url$REQ_PATH")
    [[ $connects == "1 0 " ]] || die "$name does not keep connections alive across POSTs (connects: $connects)"
done

# Prime the replay keys: the first request executes, the second must be a replay.
for s in "${SCENARIO_LIST[@]}"; do
    [[ $s == replay* ]] || continue
    url=${URL[${SERVER[$s]}]}
    code=$(post "$url" "$(replay_key)")
    [[ $code == "$EXPECT_STATUS" ]] || die "priming the replay key on ${SERVER[$s]}: got $code, not $EXPECT_STATUS"
    headers=$(curl -sS --max-time 10 "${CURL_TLS[@]}" -D - -o /dev/null -X POST -H 'Content-Type: application/json' \
        -H "Idempotency-Key: $(replay_key)" --data-binary "$BODY" "$url$REQ_PATH" | tr -d '\r')
    grep -q "^HTTP/[0-9.]* $EXPECT_STATUS" <<<"$headers" || die "replay on ${SERVER[$s]} is not $EXPECT_STATUS: $(head -1 <<<"$headers")"
    grep -qi '^idempotent-replayed: true' <<<"$headers" || die "replay on ${SERVER[$s]} lacks Idempotent-Replayed: true"
done
log "  setup checks passed: every server answers $EXPECT_STATUS and keeps POST connections alive; replay keys primed"

# What each TLS hop negotiated with the HTTPS upstream, as the upstream saw it ("HTTP/2.0
# TLSv1.3 TLS_AES_256_GCM_SHA384"): through each server whose upstream is the HTTPS one,
# with a key of its own (a miss, so the gateway's answer is fresh, not a replay).
declare -A TLS_NEGOTIATED=()
for name in upstream-tls proxy-tls gw-tls; do
    [[ -n ${URL[$name]:-} ]] || continue
    [[ $name != upstream-tls ]] || wants upstream-tls || continue
    as_wrk=()
    [[ $name == upstream-tls ]] && as_wrk=(--http1.1) # wrk offers no ALPN: HTTP/1.1
    negotiated=$(curl -sS --max-time 10 "${CURL_TLS[@]}" "${as_wrk[@]}" -D - -o /dev/null -X POST -H 'Content-Type: application/json' \
        -H "Idempotency-Key: bench-protocol-$NONCE-$name" --data-binary "$BODY" "${URL[$name]}$REQ_PATH" |
        tr -d '\r' | sed -n 's/^[Xx]-[Bb]ench-[Uu]pstream: //p')
    [[ -n $negotiated ]] || die "$name's answer lacks the HTTPS upstream's X-Bench-Upstream header"
    TLS_NEGOTIATED[$name]=$negotiated
    case $name in
    upstream-tls) via="wrk → HTTPS upstream (checked with curl --http1.1)" ;;
    proxy-tls) via="nginx proxy → HTTPS upstream" ;;
    gw-tls) via="gateway → HTTPS upstream" ;;
    esac
    log "  TLS negotiated, $via: $negotiated"
done

# ---------------------------------------------------------------- measuring

# decisions ADMIN_URL → "decision=count" lines summed over routes
decisions() {
    curl -sS --max-time 10 "$1/metrics" | awk '
        /^idem_requests_total\{/ {
            if (match($0, /decision="[^"]*"/)) { c[substr($0, RSTART + 10, RLENGTH - 11)] += $NF }
        }
        END { for (d in c) printf "%s=%d\n", d, c[d] }'
}

# delta BEFORE AFTER → "decision=+n ..." for every decision that moved
delta() {
    awk -v before="$1" -v after="$2" 'BEGIN {
        n = split(before, b, "\n"); for (i = 1; i <= n; i++) if (split(b[i], kv, "=") == 2) v[kv[1]] -= kv[2]
        n = split(after, a, "\n"); for (i = 1; i <= n; i++) if (split(a[i], kv, "=") == 2) v[kv[1]] += kv[2]
        out = ""; for (d in v) if (v[d] != 0) out = out (out == "" ? "" : " ") d "=" v[d]
        print out }'
}

declare -A RPS=() P50=() P99=() ERRORS=() RUNLOG=() SERVER_US=() UPSTREAM_US=() WRK_US=() STORE_US=()
ERRORS_TOTAL=0
ANOMALIES=()

# measure SCENARIO DURATION RECORD(0|1) ROUND
measure() {
    local s=$1 duration=$2 record=$3 round=$4
    local server=${SERVER[$s]} url mode tag decision before="" after="" moved="" out line
    url=${URL[$server]}
    mode=$(mode_of "$s")
    decision=$(decision_of "$s")
    if [[ $mode == fixed ]]; then tag=$(replay_key); else tag="bench-$NONCE-$s-$round"; fi
    [[ -n $decision ]] && before=$(decisions "${ADMIN[$server]}")
    local load server_pids upstream_pids store_pids s0 s1 u0 u1 w0 w1 d0 d1 store_kind=""
    load=$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo 0)
    server_pids=$(tree_pids "$(pid_of "$server")")
    upstream_pids=""
    [[ $server == upstream* ]] || upstream_pids=$(tree_pids "$(pid_of "$(upstream_of "$s")")")
    case $s in
    *-redis) store_kind=redis ;;
    *-postgres) store_kind=postgres ;;
    esac
    store_pids=$(store_server_pids "$store_kind" "${REDIS_URL:-redis://127.0.0.1:6379}")
    # shellcheck disable=SC2086 # lists of pids
    s0=$(cpu_ticks $server_pids) u0=$(cpu_ticks $upstream_pids) d0=$(cpu_ticks $store_pids)
    children_cpu_us w0
    out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$duration" --latency -s "$HERE/wrk/post.lua" "$url$REQ_PATH" \
        -- "$mode" "$tag" "$BODY" "$EXPECT_STATUS" 2>&1) || {
        log "$out"
        die "wrk failed on $s"
    }
    # shellcheck disable=SC2086
    s1=$(cpu_ticks $server_pids) u1=$(cpu_ticks $upstream_pids) d1=$(cpu_ticks $store_pids)
    children_cpu_us w1
    all_alive
    [[ -n $decision ]] && after=$(decisions "${ADMIN[$server]}")
    line=$(grep '^BENCH ' <<<"$out") || {
        log "$out"
        die "wrk printed no BENCH line for $s"
    }
    ((record)) || return 0

    local -A r=()
    local kv
    for kv in ${line#BENCH }; do r[${kv%%=*}]=${kv#*=}; done
    # unexpected_status (not 201) includes wrk's status_err (>= 400); count each answer once.
    local bad_status=$((r[unexpected_status] > r[status_err] ? r[unexpected_status] : r[status_err]))
    local errs=$((r[connect_err] + r[read_err] + r[write_err] + r[timeout_err] + bad_status))
    local problems=()
    if ((errs > 0)); then
        problems+=("$errs errors: connect=${r[connect_err]} read=${r[read_err]} write=${r[write_err]} timeout=${r[timeout_err]} status>=400=${r[status_err]} not-$EXPECT_STATUS=${r[unexpected_status]} (first: ${r[first_unexpected]})")
    fi
    if [[ -n $decision ]]; then
        moved=$(delta "$before" "$after")
        local counted=0 other=""
        for kv in $moved; do
            if [[ ${kv%%=*} == "$decision" ]]; then counted=${kv#*=}; else other+=" $kv"; fi
        done
        # wrk counts answers it read; the gateway may finish a few more that were in flight at the end.
        if ((counted < r[requests])); then
            problems+=("gateway counted $counted '$decision' decisions for ${r[requests]} answered requests")
        fi
        [[ -n $other ]] && problems+=("gateway counted other decisions:$other")
    fi
    ERRORS_TOTAL=$((ERRORS_TOTAL + errs))
    ERRORS[$s]=$((${ERRORS[$s]:-0} + errs))
    local server_us upstream_us wrk_us store_us
    server_us=$(awk -v d=$((s1 - s0)) -v t="$TICK" -v n="${r[requests]}" 'BEGIN { if (n > 0) printf "%.1f", d * 1e6 / t / n; else print 0 }')
    upstream_us=$(awk -v d=$((u1 - u0)) -v t="$TICK" -v n="${r[requests]}" 'BEGIN { if (n > 0) printf "%.1f", d * 1e6 / t / n; else print 0 }')
    wrk_us=$(awk -v d=$((w1 - w0)) -v n="${r[requests]}" 'BEGIN { if (n > 0) printf "%.1f", d / n; else print 0 }')
    store_us=$(awk -v d=$((d1 - d0)) -v t="$TICK" -v n="${r[requests]}" 'BEGIN { if (n > 0) printf "%.1f", d * 1e6 / t / n; else print 0 }')
    STORE_US[$s]+="$store_us "
    SERVER_US[$s]+="$server_us "
    WRK_US[$s]+="$wrk_us "
    UPSTREAM_US[$s]+="$upstream_us "
    RPS[$s]+="${r[rps]} "
    P50[$s]+="${r[p50_us]} "
    P99[$s]+="${r[p99_us]} "
    RUNLOG[$s]+="{\"round\":$round,\"requests\":${r[requests]},\"duration_us\":${r[duration_us]},\"rps\":${r[rps]},\"mean_us\":${r[mean_us]},\"p50_us\":${r[p50_us]},\"p90_us\":${r[p90_us]},\"p99_us\":${r[p99_us]},\"max_us\":${r[max_us]},\"errors\":{\"connect\":${r[connect_err]},\"read\":${r[read_err]},\"write\":${r[write_err]},\"timeout\":${r[timeout_err]},\"status_ge_400\":${r[status_err]},\"not_$EXPECT_STATUS\":${r[unexpected_status]}},\"gateway_decisions\":\"$moved\",\"server_cpu_us_per_request\":$server_us,\"upstream_cpu_us_per_request\":$upstream_us,\"wrk_cpu_us_per_request\":$wrk_us,\"store_server_cpu_us_per_request\":$store_us,\"loadavg_1m_before\":$load},"
    printf '  round %d  %-36s %9.0f req/s  p50 %6.2f ms  p99 %6.2f ms  load %s%s\n' "$round" "${LABEL[$s]}" \
        "${r[rps]}" "$(awk -v u="${r[p50_us]}" 'BEGIN{print u/1000}')" "$(awk -v u="${r[p99_us]}" 'BEGIN{print u/1000}')" \
        "$load" "${moved:+  [$moved]}" >&2
    local p
    for p in "${problems[@]}"; do
        log "  !!!!! ${LABEL[$s]}, round $round: $p"
        ANOMALIES+=("${LABEL[$s]}, round $round: $p")
    done
}

if [[ $WARMUP != 0 && $WARMUP != 0s ]]; then
    log "warming up ($WARMUP per scenario, discarded)"
    for s in "${SCENARIO_LIST[@]}"; do measure "$s" "$WARMUP" 0 0; done
fi
for ((round = 1; round <= RUNS; round++)); do
    log "round $round of $RUNS"
    for s in "${SCENARIO_LIST[@]}"; do measure "$s" "$DURATION" 1 "$round"; done
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')

# ---------------------------------------------------------------- report

median() { # numbers... → their median
    printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END {
        if (NR == 0) exit 1
        if (NR % 2) printf "%.6g\n", a[(NR + 1) / 2]; else printf "%.6g\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

declare -A MED_RPS=() MED_P50=() MED_P99=() MED_SERVER_US=() MED_UPSTREAM_US=() MED_WRK_US=() MED_STORE_US=() RATIO=() GOAL=()
for s in "${SCENARIO_LIST[@]}"; do
    # shellcheck disable=SC2086
    MED_SERVER_US[$s]=$(median ${SERVER_US[$s]})
    # shellcheck disable=SC2086
    MED_UPSTREAM_US[$s]=$(median ${UPSTREAM_US[$s]})
    # shellcheck disable=SC2086
    MED_WRK_US[$s]=$(median ${WRK_US[$s]})
    # shellcheck disable=SC2086
    MED_STORE_US[$s]=$(median ${STORE_US[$s]})
    # shellcheck disable=SC2086 # word splitting intended
    MED_RPS[$s]=$(median ${RPS[$s]})
    # shellcheck disable=SC2086
    MED_P50[$s]=$(median ${P50[$s]})
    # shellcheck disable=SC2086
    MED_P99[$s]=$(median ${P99[$s]})
done
ratio() { # SCENARIO OTHER → SCENARIO's median req/s over OTHER's, "" when OTHER did not run
    [[ -n ${MED_RPS[$2]:-} ]] || return 0
    awk -v a="${MED_RPS[$1]}" -v b="${MED_RPS[$2]}" 'BEGIN { if (b > 0) printf "%.3f", a / b }'
}
declare -A RATIO_PROXY=() RATIO_PLAIN=()
for s in "${SCENARIO_LIST[@]}"; do
    RATIO[$s]=$(ratio "$s" "$(baseline_of "$s")")
    RATIO_PROXY[$s]=$(ratio "$s" proxy)
    plain=$(plaintext_of "$s")
    RATIO_PLAIN[$s]=""
    [[ -n $plain ]] && RATIO_PLAIN[$s]=$(ratio "$s" "$plain")
    goal=""
    case $s in
    miss) goal=$GOAL_MISS ;;
    replay) goal=$GOAL_REPLAY ;;
    miss-redis) goal=$GOAL_MISS_REDIS ;;
    replay-redis) goal=$GOAL_REPLAY_REDIS ;;
    miss-postgres) goal=$GOAL_MISS_POSTGRES ;;
    esac
    GOAL[$s]=$goal
done

goal_text() {
    local s=$1
    [[ -n ${GOAL[$s]} && -n ${RATIO[$s]} ]] || return 0
    if awk -v r="${RATIO[$s]}" -v g="${GOAL[$s]}" 'BEGIN { exit !(r >= g) }'; then
        printf 'goal >= %.2fx: met' "${GOAL[$s]}"
    else
        printf 'goal >= %.2fx: NOT MET' "${GOAL[$s]}"
    fi
}

echo
echo "idem gateway benchmark — $STARTED_AT, commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
echo "wrk -t$THREADS -c$CONNECTIONS -d$DURATION, POST $REQ_PATH ($((${#BODY})) B JSON), median of $RUNS run(s);" \
    "$NPROC cores shared by load generator and servers; load average $LOAD_START at start, $LOAD_END at end"
echo
printf '%-36s %10s %9s %9s %9s %-10s %9s %9s %9s %9s %s\n' "scenario" "req/s" "p50 ms" "p99 ms" "x base" "base" "CPU-µs" "upstr µs" "store µs" "wrk µs" ""
printf '%-36s %10s %9s %9s %9s %-10s %9s %9s %9s %9s %s\n' "------------------------------------" "----------" "---------" "---------" "---------" "----------" "---------" "---------" "---------" "---------" ""
for s in "${SCENARIO_LIST[@]}"; do
    ratio=${RATIO[$s]:+${RATIO[$s]}x}
    note=$(goal_text "$s")
    if ((${ERRORS[$s]:-0} > 0)); then note="${note:+$note; }${ERRORS[$s]} ERRORS"; fi
    printf '%-36s %10.0f %9.2f %9.2f %9s %-10s %9s %9s %9s %9s %s\n' "${LABEL[$s]}" "${MED_RPS[$s]}" \
        "$(awk -v u="${MED_P50[$s]}" 'BEGIN{print u/1000}')" "$(awk -v u="${MED_P99[$s]}" 'BEGIN{print u/1000}')" \
        "${ratio:-n/a}" "$(baseline_of "$s")" "${MED_SERVER_US[$s]}" "${MED_UPSTREAM_US[$s]}" "${MED_STORE_US[$s]}" "${MED_WRK_US[$s]}" "$note"
done
echo "x base: req/s over the base row's in this run (proxy: wrk → nginx → upstream; proxy-tls: the same with"
echo "        an HTTPS upstream); n/a when the base row did not run"
echo "CPU-µs: the server under test's CPU time (user + system, every thread or worker) per answered request;"
echo "        upstr µs: the upstream nginx's (0 when the server answered alone); store µs: the Redis or"
echo "        PostgreSQL server's (0 for the embedded stores); wrk µs: the load generator's. When the cores"
echo "        are busy, req/s ≈ cores × 1e6 / (CPU-µs + upstr µs + store µs + wrk µs)"
tls_cost=""
for s in "${SCENARIO_LIST[@]}"; do
    [[ -n ${RATIO_PLAIN[$s]} ]] && tls_cost+="  $s ${RATIO_PLAIN[$s]}x of $(plaintext_of "$s")"
done
[[ -n $tls_cost ]] && echo "cost of TLS to the upstream (req/s, TLS row over its plaintext twin):$tls_cost"
for name in upstream-tls proxy-tls gw-tls; do
    [[ -n ${TLS_NEGOTIATED[$name]:-} ]] && echo "negotiated with the HTTPS upstream by $name: ${TLS_NEGOTIATED[$name]}"
done
echo

json_string() { # a JSON string literal
    local s=$1
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\n'/\\n}
    s=${s//$'\t'/\\t}
    printf '"%s"' "$s"
}

mkdir -p "$OUT_DIR"
OUT_FILE=$OUT_DIR/gateway-$(date -u +%Y%m%dT%H%M%SZ).json
{
    printf '{\n'
    printf '  "benchmark": "idem gateway vs bare nginx proxy",\n'
    printf '  "started_at": %s,\n' "$(json_string "$STARTED_AT")"
    printf '  "commit": %s,\n' "$(json_string "$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)")"
    printf '  "worktree_dirty": %s,\n' "$([[ -n $(git -C "$ROOT" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null) ]] && echo true || echo false)"
    printf '  "host": {"cores": %s, "kernel": %s, "loadavg_start": %s, "loadavg_end": %s, "tmp_fs": %s},\n' \
        "$NPROC" "$(json_string "$(uname -r)")" "$(json_string "$LOAD_START")" "$(json_string "$LOAD_END")" "$(json_string "$TMP_FS")"
    printf '  "tools": {"wrk": %s, "nginx": %s},\n' \
        "$(json_string "$(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)")" "$(json_string "$("$NGINX" -v 2>&1 | head -1)")"
    printf '  "settings": {"duration": %s, "runs": %s, "connections": %s, "threads": %s, "warmup": %s, "proxy_workers": %s, "method": "POST", "path": %s, "body": %s, "expect_status": %s},\n' \
        "$(json_string "$DURATION")" "$RUNS" "$CONNECTIONS" "$THREADS" "$(json_string "$WARMUP")" \
        "$(json_string "$PROXY_WORKERS")" "$(json_string "$REQ_PATH")" "$(json_string "$BODY")" "$EXPECT_STATUS"
    printf '  "goals": {"miss_vs_proxy": %s, "replay_vs_proxy": %s, "miss_redis_vs_proxy": %s, "replay_redis_vs_proxy": %s, "miss_postgres_vs_proxy": %s},\n' \
        "$GOAL_MISS" "$GOAL_REPLAY" "$GOAL_MISS_REDIS" "$GOAL_REPLAY_REDIS" "$GOAL_MISS_POSTGRES"
    if ((WANTS_TLS)); then
        negotiated="" sep=""
        for name in upstream-tls proxy-tls gw-tls; do
            [[ -n ${TLS_NEGOTIATED[$name]:-} ]] || continue
            negotiated+="$sep$(json_string "$name"): $(json_string "${TLS_NEGOTIATED[$name]}")"
            sep=", "
        done
        printf '  "tls": {"upstream": %s, "certificate": "ECDSA P-256, private CA made at run time", "h2_offered": %s, "negotiated": {%s}},\n' \
            "$(json_string "$UPSTREAM_TLS_URL")" "$([[ $TLS_HTTP2 == yes ]] && echo true || echo false)" "$negotiated"
    fi
    printf '  "scenarios": [\n'
    sep=""
    for s in "${SCENARIO_LIST[@]}"; do
        runs=${RUNLOG[$s]}
        printf '%s    {"name": %s, "label": %s, "rps": %s, "p50_ms": %s, "p99_ms": %s, "baseline": %s, "ratio_to_baseline": %s, "ratio_to_proxy": %s, "ratio_to_plaintext": %s, "goal": %s, "errors": %s,\n' \
            "$sep" "$(json_string "$s")" "$(json_string "${LABEL[$s]}")" "${MED_RPS[$s]}" \
            "$(awk -v u="${MED_P50[$s]}" 'BEGIN{printf "%.3f", u/1000}')" \
            "$(awk -v u="${MED_P99[$s]}" 'BEGIN{printf "%.3f", u/1000}')" \
            "$(json_string "$(baseline_of "$s")")" "${RATIO[$s]:-null}" "${RATIO_PROXY[$s]:-null}" \
            "${RATIO_PLAIN[$s]:-null}" "${GOAL[$s]:-null}" "${ERRORS[$s]:-0}"
        printf '     "runs": [%s]}' "${runs%,}"
        sep=$',\n'
    done
    printf '\n  ],\n'
    printf '  "anomalies": ['
    sep=""
    for a in "${ANOMALIES[@]}"; do
        printf '%s%s' "$sep" "$(json_string "$a")"
        sep=", "
    done
    printf '],\n'
    printf '  "errors_total": %s\n' "$ERRORS_TOTAL"
    printf '}\n'
} >"$OUT_FILE"
echo "wrote $OUT_FILE"

if ((${#ANOMALIES[@]} > 0)); then
    echo
    echo "!!!!! ${#ANOMALIES[@]} run(s) had errors or unexpected gateway decisions; the ratios above are not trustworthy:"
    for a in "${ANOMALIES[@]}"; do echo "!!!!!   $a"; done
    exit 3
fi
