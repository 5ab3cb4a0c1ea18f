#!/usr/bin/env bash
# bench/crash.sh — the long run of the crash-and-history harness (tests/it/crash.rs).
#
# A check, not a benchmark: it exits non-zero when the checker found a broken promise (a
# key executed twice, a final answer not kept, an in-flight loss that is not an explicit
# outcome_unknown, an answer no retry should get) or when the harness could not run.
#
# What runs: the same two tests as CI's short mode, built in release, one after the
# other (so they do not share the cores):
#   sqlite    16 clients retry their intents (same key and body every retry) through one
#             gateway on a SQLite file (synchronous=full) that is kill -9ed KILLS times at
#             random moments and restarted at once
#   postgres  the same through two gateways on one PostgreSQL schema, killed in turn
# then, per store, a last kill -9 and restart, a replay of every settled intent, and the
# checker over the client history, the demo upstream's per-key effects and the store's
# records (idem log list). Each test prints one line:
#   crash harness (STORE): intents N, kills K, effects E, duplicates 0, lost 0, unknown U …
# and writes its history (JSON Lines) to target/tmp/crash-STORE.jsonl; on failure the
# gateways' logs go next to it, and the message names the seed that repeats the run.
#
# Run time on the reference machine (2 cores): the release build, then about
# KILLS x 0.5 s per store plus the replay pass.
#
# Usage:
#   bench/crash.sh                               # 60 kills per store
#   KILLS=200 bench/crash.sh                     # longer
#   SEED=1234 bench/crash.sh crash::a_sqlite     # one store, the random choices of a past run
#
# Environment:
#   KILLS=60        kills per store (IDEM_CRASH_KILLS)
#   CLIENTS=16      concurrent clients (IDEM_CRASH_CLIENTS)
#   SEED=           the seed of bodies, delays and kill moments (IDEM_CRASH_SEED; random)
#   IDEM_TEST_POSTGRES_URL=postgres://root@127.0.0.1:5432/test   the PostgreSQL server
#
# Arguments: nextest test filters (default: crash, both stores).
#
# Needs: cargo, cargo-nextest, a PostgreSQL server.

set -euo pipefail
cd "$(dirname "$0")/.."

export IDEM_CRASH_KILLS="${KILLS:-60}"
if [[ -n "${CLIENTS:-}" ]]; then export IDEM_CRASH_CLIENTS="$CLIENTS"; fi
if [[ -n "${SEED:-}" ]]; then export IDEM_CRASH_SEED="$SEED"; fi
filters=("$@")
if [[ ${#filters[@]} -eq 0 ]]; then filters=(crash); fi

output="$(mktemp)"
trap 'rm -f "$output"' EXIT
started=$SECONDS
status=0
# --no-capture shows the figures as they come, and runs the tests one at a time.
cargo nextest run --release --test it --no-fail-fast --no-capture "${filters[@]}" 2>&1 | tee "$output" ||
    status=$?

echo
echo "crash harness, ${IDEM_CRASH_KILLS} kills per store, $((SECONDS - started)) s in all (build included):"
grep '^crash harness (' "$output" || echo "  no figures: the harness did not run to its end"
exit "$status"
