#!/usr/bin/env bash
# Runs every fuzz target for a bounded time (default 30 s each) with cargo-fuzz on the nightly
# toolchain. New inputs go to a scratch directory, so the committed seed corpora stay small.
# A crash fails the run and leaves the input in fuzz/artifacts/<target>/.
#
#   bash fuzz/run.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-30}
command -v cargo-fuzz >/dev/null || { echo "fuzz/run.sh: cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2; exit 1; }
rustup run nightly rustc --version >/dev/null 2>&1 || { echo "fuzz/run.sh: the nightly toolchain is missing" >&2; exit 1; }
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for target in $(cargo +nightly fuzz list); do
  mkdir -p "$scratch/$target"
  echo "fuzzing $target for ${seconds}s"
  if ! cargo +nightly fuzz run "$target" "$scratch/$target" "corpus/$target" -- \
      -max_total_time="$seconds" -print_final_stats=1 >"$scratch/$target.log" 2>&1; then
    tail -40 "$scratch/$target.log" >&2
    echo "fuzz/run.sh: $target failed; the crashing input is in fuzz/artifacts/$target/" >&2
    exit 1
  fi
  grep -E '^Done|stat::number_of_executed_units' "$scratch/$target.log" || true
done
