#!/usr/bin/env bash
# bench/fuzz.sh — runs every cargo-fuzz target (fuzz/fuzz_targets) in turn and prints what
# each did: seconds, executions, executions per second, corpus entries, and findings.
#
# A check, not a benchmark: it exits non-zero when a target crashed, timed out or ran out of
# memory, or could not be built. A finding's input is in fuzz/artifacts/TARGET/; minimise it
# with `RUSTC_BOOTSTRAP=1 cargo fuzz tmin TARGET fuzz/artifacts/TARGET/crash-…`, keep it under
# fuzz/regressions/TARGET/ and turn it into a regression test in src/.
#
# What runs, one target at a time (never two at once: they would share the cores):
#   libFuzzer on fuzz/corpus/TARGET (grown, git-ignored) seeded from fuzz/seeds/TARGET
#   (committed), single process (-jobs=1 -workers=1), -max_total_time=FUZZ_SECONDS,
#   -print_final_stats=1. Each run's log is bench/out/fuzz-STAMP/TARGET.log and the table
#   is bench/out/fuzz-STAMP/summary.txt.
#
# cargo-fuzz needs nightly compiler flags (-Zsanitizer, sanitizer coverage); on the stable
# toolchain RUSTC_BOOTSTRAP=1 unlocks them, and AddressSanitizer's runtime ships with stable.
# The targets are built once, then the binaries run directly, so an edit to src/ in the
# middle of a run does not rebuild (or break) the targets still to run.
#
# Run time: the build (about 11 min from scratch on the reference machine, 2 cores; a few
# seconds when nothing changed), then FUZZ_SECONDS per target.
#
# Usage:
#   bench/fuzz.sh                               # every target, 600 s each
#   FUZZ_SECONDS=60 bench/fuzz.sh               # a quick pass
#   bench/fuzz.sh config template               # some targets
#
# Environment:
#   FUZZ_SECONDS=600      seconds per target
#   FUZZ_SANITIZER=address   address or none (cargo fuzz --sanitizer)
#   FUZZ_TIMEOUT=30       seconds one input may take before libFuzzer calls it a hang
#
# Arguments: target names (default: every target in fuzz/Cargo.toml).
#
# Needs: cargo, cargo-fuzz (`cargo install cargo-fuzz --locked`), a C++ compiler.

set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_SECONDS:-600}
sanitizer=${FUZZ_SANITIZER:-address}
timeout=${FUZZ_TIMEOUT:-30}
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2
    exit 2
fi

if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

out="bench/out/fuzz-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$out"
echo "building ${targets[*]} (sanitizer $sanitizer) ..." >&2
for target in "${targets[@]}"; do
    cargo fuzz build --sanitizer "$sanitizer" "$target" >>"$out/build.log" 2>&1 || {
        echo "cargo fuzz build $target failed; see $out/build.log" >&2
        exit 2
    }
done
root=$(pwd)
bin_dir="$root/fuzz/target/$(rustc -vV | sed -n 's/^host: //p')/release"

failed=0
printf '%-16s %8s %12s %9s %8s  %s\n' target seconds executions exec/s corpus findings >"$out/summary.txt"
for target in "${targets[@]}"; do
    corpus="$root/fuzz/corpus/$target"
    artifacts="$root/fuzz/artifacts/$target"
    mkdir -p "$corpus" "$artifacts"
    log="$out/$target.log"
    echo "fuzzing $target for ${seconds}s (log: $log) ..." >&2
    started=$(date +%s)
    status=0
    # -jobs=1 runs the fuzzer in one child process whose output libFuzzer writes to
    # fuzz-0.log in the working directory: run it in the output directory, then move it.
    (cd "$out" && ASAN_OPTIONS=detect_odr_violation=0 "$bin_dir/$target" "$corpus" "$root/fuzz/seeds/$target" \
        -artifact_prefix="$artifacts/" -max_total_time="$seconds" -timeout="$timeout" \
        -print_final_stats=1 -jobs=1 -workers=1 >"$target.parent.log" 2>&1) || status=$?
    mv "$out/fuzz-0.log" "$log" 2>/dev/null || mv "$out/$target.parent.log" "$log"
    rm -f "$out/$target.parent.log"
    took=$(($(date +%s) - started))
    executions=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    # The corpus as libFuzzer last reported it (seeds included), else the files it kept.
    entries=$(grep -oE 'corp: [0-9]+' "$log" | tail -1 | sed 's/corp: //' || true)
    entries=${entries:-$(find "$corpus" -type f | wc -l)}
    findings=$(grep -ohE '(crash|timeout|oom|leak|slow-unit)-[0-9a-f]{40}' "$log" | sort -u | tr '\n' ' ' || true)
    if [ "$status" -ne 0 ] || [ -n "$findings" ]; then
        failed=1
        findings="${findings:-exit $status} (see $log)"
    fi
    printf '%-16s %8s %12s %9s %8s  %s\n' "$target" "$took" "${executions:-?}" "${rate:-?}" "$entries" \
        "${findings:-none}" >>"$out/summary.txt"
done

cat "$out/summary.txt"
exit "$failed"
