#!/usr/bin/env bash
# A bounded smoke of every fuzz target: build them (cargo-fuzz, libFuzzer),
# then run each for FUZZ_SECONDS (default 5) from its seeds in fuzz/seeds
# and what earlier runs found in fuzz/corpus. A crash fails the script and
# leaves the input in fuzz/artifacts/<target>/; see the README's Testing
# section for turning it into a regression test.
#
# Only the stable toolchain is assumed: cargo-fuzz needs nightly's -Z
# flags (the sanitizer), which RUSTC_BOOTSTRAP=1 lets stable rustc accept.
# FUZZ_SANITIZER=none drops AddressSanitizer (squire has little unsafe code of
# its own; libFuzzer's coverage guidance still works) if a toolchain's
# sanitizer runtime is missing.
#
# The build is a dev one (no optimizations) unless FUZZ_PROFILE=release:
# a cold instrumented release build of squire and its dependencies takes
# many minutes, a dev one a fraction of that, and a smoke of seconds needs
# correctness more than speed. FUZZ_TARGET_DIR sets cargo's target dir.
#
# Usage: fuzz/smoke.sh [target...]   (default: every target)
set -euo pipefail
cd "$(dirname "$0")"

seconds="${FUZZ_SECONDS:-5}"
sanitizer="${FUZZ_SANITIZER:-address}"
flags=(--sanitizer "$sanitizer")
if [ "${FUZZ_PROFILE:-dev}" = dev ]; then
    flags+=(--dev)
fi
if [ -n "${FUZZ_TARGET_DIR:-}" ]; then
    flags+=(--target-dir "$FUZZ_TARGET_DIR")
fi
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz/smoke.sh: installing cargo-fuzz (once; it stays in ~/.cargo/bin)"
    cargo install cargo-fuzz --locked
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

start=$SECONDS
# One build of every target: the instrumented build of squire and its
# dependencies is nearly all the time this script takes.
cargo fuzz build "${flags[@]}"
built=$((SECONDS - start))

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target"
    status=0
    cargo fuzz run "${flags[@]}" "$target" "corpus/$target" "seeds/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1 || status=$?
    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")"
    echo "fuzz/smoke.sh: $target: ${runs:-?} inputs in ${seconds}s"
    if [ "$status" -ne 0 ]; then
        tail -n 40 "$log" >&2
        echo "fuzz/smoke.sh: $target FAILED (exit $status); the input is in fuzz/artifacts/$target/" >&2
        exit 1
    fi
done
echo "fuzz/smoke.sh: ${#targets[@]} targets, build ${built}s, total $((SECONDS - start))s"
