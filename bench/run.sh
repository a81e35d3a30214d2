#!/usr/bin/env bash
# The k3sense benchmark, in one command: builds the release binaries, then `loadgen bench` starts
# k3sense and Mosquitto's WebSocket listener on fresh processes at 10, 100, 1,000 and 10,000
# clients, alternating, in two placements, measures the idle footprint, and prints a markdown
# report:
#   equal CPU  both servers pinned to core 0 with `taskset -c 0` (`k3sense all` vs Mosquitto),
#              the load tool on the other core(s): the fair comparison, reported first;
#   spread     servers unpinned beside the load tool (`k3sense broker` + `k3sense gateway`).
#
#   bench/run.sh              both placements (~18 minutes; the report of BENCHMARKS.md)
#   bench/run.sh --equal-cpu  equal CPU only (~9 minutes); --spread: spread only
#   bench/run.sh --quick      fewer readings, 10 s idle window (~2 minutes per placement)
#   bench/run.sh --smoke      10 clients, 5 readings (seconds): CI checks the benchmark still works
#   bench/run.sh --out FILE   also write the report to FILE
#
# Needs Debian's mosquitto (/usr/sbin/mosquitto; the system service is not used) and taskset
# (util-linux); equal CPU needs 2 cores or more.
set -euo pipefail
cd "$(dirname "$0")/.."

size=full
args=()
for arg in "$@"; do
  case "$arg" in
    --quick) size=quick ;;
    --smoke) size=smoke ;;
    *) args+=("$arg") ;;
  esac
done

revision="${BENCH_REVISION:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
if [ -z "${BENCH_REVISION:-}" ] && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  revision="$revision (with uncommitted changes)"
fi
target_dir="${CARGO_TARGET_DIR:-target}"
cargo build --release -p k3sense -p loadgen
exec "$target_dir/release/loadgen" bench --size "$size" \
  --k3sense "$target_dir/release/k3sense" --work-dir "$target_dir/bench" \
  --command "bench/run.sh $*" --revision "$revision" ${args[@]+"${args[@]}"}
