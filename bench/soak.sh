#!/usr/bin/env bash
# bench/soak.sh — a long run of the gateway at a steady rate (default: half of the miss
# capacity measured by bench/gateway.sh on the reference machine), watching for growth:
# the gateway's RSS and open file descriptors, the store's size on disk and the p99
# latency, per window, first window against last. Not a test: it prints, it never fails on
# numbers. Records expire after TTL and the gateway purges them (PURGE_INTERVAL), so a
# store that keeps growing past the first TTL is a finding.
#
#   bench/soak.sh                            # 1 hour at 6 000 req/s, 20 % replays
#   SECONDS_TOTAL=600 RATE=3000 bench/soak.sh
#
# Knobs: RATE=6000 SECONDS_TOTAL=3600 WINDOW=60 REPLAYS=0.2 TTL=10m PURGE_INTERVAL=30s
#        SKIP_BUILD=1 KEEP_TMP=1 BENCH_TMPDIR=dir OUT_DIR=dir (default bench/out)
# Needs: bash, cargo, nginx (installed with apt-get when missing).
set -euo pipefail

SCRIPT=soak.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
RATE=${RATE:-6000}
SECONDS_TOTAL=${SECONDS_TOTAL:-3600}
WINDOW=${WINDOW:-60}
REPLAYS=${REPLAYS:-0.2}
TTL=${TTL:-10m}
PURGE_INTERVAL=${PURGE_INTERVAL:-30s}
SKIP_BUILD=${SKIP_BUILD:-0}
KEEP_TMP=${KEEP_TMP:-0}
OUT_DIR=${OUT_DIR:-$ROOT/bench/out}
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"

[[ $RATE =~ ^[1-9][0-9]*$ ]] || die "RATE must be a positive integer (got '$RATE')"
[[ $SECONDS_TOTAL =~ ^[1-9][0-9]*$ ]] || die "SECONDS_TOTAL must be a positive integer"
need_packages nginx curl
[[ $SKIP_BUILD == 1 ]] || release_build --bin idem --example soak
IDEM_BIN=$ROOT/target/release/idem
SOAK_BIN=$ROOT/target/release/examples/soak
[[ -x $IDEM_BIN && -x $SOAK_BIN ]] || die "build $IDEM_BIN and $SOAK_BIN first"

make_tmp idem-soak
start_nginx_upstream
cat >"$TMP/gateway.toml" <<TOML
purge_interval = "$PURGE_INTERVAL"
[[routes]]
name = "orders"
path = "/v1/orders"
ttl = "$TTL"
TOML
free_port PORT
free_port ADMIN
start gateway "$IDEM_BIN" gateway --config "$TMP/gateway.toml" --listen "127.0.0.1:$PORT" \
    --admin-listen "127.0.0.1:$ADMIN" --upstream "$UPSTREAM_URL" --store "sqlite://$TMP/soak.db"
wait_port gateway "$PORT"
GATEWAY_PID=${PIDS[${#PIDS[@]} - 1]}

mkdir -p "$OUT_DIR"
OUT=$OUT_DIR/soak-$(date -u +%Y%m%dT%H%M%SZ).txt
{
    echo "idem soak — $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "$(nproc) cores; load average $(cut -d' ' -f1-3 /proc/loadavg); store sqlite synchronous=full on $(stat -f -c %T "$TMP")"
    echo "route ttl $TTL, purge every $PURGE_INTERVAL"
} | tee "$OUT"
"$SOAK_BIN" --url "http://127.0.0.1:$PORT/v1/orders" --pid "$GATEWAY_PID" --store "$TMP/soak.db" \
    --rate "$RATE" --seconds "$SECONDS_TOTAL" --window "$WINDOW" --replays "$REPLAYS" | tee -a "$OUT"
kill -0 "$GATEWAY_PID" 2>/dev/null || { show_logs gateway; die "the gateway died during the soak"; }
echo "records at the end: $(curl -s "http://127.0.0.1:$ADMIN/v1/stats")" | tee -a "$OUT"
log "wrote $OUT"
