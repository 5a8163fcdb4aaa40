#!/usr/bin/env bash
# Runs every fuzz target of the workspace for a fixed number of iterations, on the stable
# toolchain: libFuzzer (from the libfuzzer-sys crate) with coverage from LLVM's
# SanitizerCoverage, whose flags are stable rustc `-C` options. No sanitizer: Veil's
# decoders are safe Rust, so what fuzzing hunts here is panics, overflows (checked) and
# runaway time or memory.
#
# Layout: `<crate>/fuzz/` is a package outside the workspace; each target is
# `<crate>/fuzz/fuzz_targets/<name>.rs`, declared as a `[[bin]]` of that name; optional
# seeds live in `<crate>/fuzz/seeds/<name>/`. The growing corpus is kept in the cache,
# outside the repository. A crash leaves its input in the corpus directory's `crashes/`
# and fails the run.
#
# FUZZ_RUNS (default 100000) inputs per target; FUZZ_TARGETS narrows to names matching a
# pattern.
set -euo pipefail
cd "$(dirname "$0")/../.."

FUZZ_RUNS="${FUZZ_RUNS:-100000}"
FUZZ_TARGETS="${FUZZ_TARGETS:-.}"
VEIL_CACHE="${VEIL_CACHE:-/var/cache/veil}"
TRIPLE="$(rustc -vV | sed -n 's/^host: //p')"
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cdebug-assertions -Coverflow-checks"

say() { printf '[fuzz %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

status=0
for manifest in */fuzz/Cargo.toml; do
  dir="$(dirname "$manifest")"
  crate="$(dirname "$dir")"
  matching=0
  for source in "$dir"/fuzz_targets/*.rs; do
    [[ "$(basename "$source" .rs)" =~ $FUZZ_TARGETS ]] && matching=1
  done
  [ "$matching" -eq 1 ] || continue
  # --target keeps RUSTFLAGS off build scripts and proc macros (they must not be instrumented).
  say "$crate: building"
  cargo build -q --release --manifest-path "$manifest" --target "$TRIPLE" \
    --target-dir "$VEIL_CACHE/fuzz-target"
  for source in "$dir"/fuzz_targets/*.rs; do
    name="$(basename "$source" .rs)"
    [[ "$name" =~ $FUZZ_TARGETS ]] || continue
    corpus="$VEIL_CACHE/fuzz-corpus/$crate/$name"
    crashes="$corpus/crashes"
    mkdir -p "$corpus" "$crashes"
    seeds=()
    [ -d "$dir/seeds/$name" ] && seeds=("$dir/seeds/$name")
    start=$(date +%s)
    log="$(mktemp)"
    if "$VEIL_CACHE/fuzz-target/$TRIPLE/release/$name" -runs="$FUZZ_RUNS" \
      -artifact_prefix="$crashes/" -print_final_stats=1 "$corpus" "${seeds[@]}" >"$log" 2>&1; then
      runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
      say "$crate/$name: ${runs:-?} inputs, 0 crashes, $(( $(date +%s) - start ))s"
    else
      say "$crate/$name: FAILED after $(( $(date +%s) - start ))s; input in $crashes/"
      tail -40 "$log"
      status=1
    fi
    rm -f "$log"
  done
done
exit $status
