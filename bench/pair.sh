#!/usr/bin/env bash
# CPU per reading of two servers measured side by side: both on core 0 at the same time, each
# fed by its own `loadgen measure` on core 1, so that both see the same machine.
#
#   bench/pair.sh CLIENTS PAIRS A B      A, B: a k3sense binary's path, or `mosquitto`
#
# Why: on a shared VM the speed of a core wanders by more than the cuts being measured (the same
# binary, run minutes apart, measured 0.57 and 1.76 ms of CPU per reading). Run at the same time
# on the same core, the two servers share whatever the machine does, and their ratio holds
# still (BENCHMARKS.md, "What was cut", cut 3). Each pair runs 20 and then 220 readings at 20/s
# (bench/probe.sh, perf stat of the whole server); per reading = (220-run − 20-run) ÷ 200, so
# start-up and connecting cancel out. The order of A and B swaps every pair. Prints one line per
# pair and the median of B ÷ A.
#
# Needs what bench/probe.sh needs (perf, taskset, curl, Mosquitto; `cargo build --release -p
# k3sense -p loadgen` first).
set -euo pipefail
cd "$(dirname "$0")/.."
clients=$1 pairs=$2 a=$3 b=$4
work=${PAIR_DIR:-target/pair}
mkdir -p "$work"

# CPU milliseconds and context switches of one perf stat --per-thread output, summed.
sum() {
  awk '/msec +task-clock/ { gsub(",", "", $2); ms += $2 }
       /context-switches/ { gsub(",", "", $2); cs += $2 }
       END { printf "%.3f %d\n", ms, cs }' "$1"
}

# One server for READINGS readings in DIR.
one() {
  local bin=$1 readings=$2 dir=$3 kind=all
  mkdir -p "$dir"
  [ "$bin" = mosquitto ] && kind=mosquitto
  K3SENSE_BIN=$bin PROBE_DIR=$dir bench/probe.sh $kind stat "$readings" "$clients" > "$dir/log.txt" 2>&1 \
    || { echo "bench/probe.sh failed for $bin, see $dir/log.txt" >&2; return 1; }
  sum "$dir/out.txt"
}

# Per-reading CPU (ms) and context switches of one server from its two runs.
per_reading() {
  read -r c1 s1 < "$1/short.txt"; read -r c2 s2 < "$1/long.txt"
  awk -v c1="$c1" -v c2="$c2" -v s1="$s1" -v s2="$s2" 'BEGIN { printf "%.3f %.2f\n", (c2-c1)/200, (s2-s1)/200 }'
}

ratios=()
for i in $(seq 1 "$pairs"); do
  if [ $((i % 2)) = 1 ]; then first=$a second=$b; else first=$b second=$a; fi
  mkdir -p "$work/first" "$work/second"
  one "$first" 20 "$work/1-20" > "$work/first/short.txt" & one "$second" 20 "$work/2-20" > "$work/second/short.txt" & wait
  one "$first" 220 "$work/1-220" > "$work/first/long.txt" & one "$second" 220 "$work/2-220" > "$work/second/long.txt" & wait
  read -r fc fs < <(per_reading "$work/first"); read -r sc ss < <(per_reading "$work/second")
  if [ "$first" = "$a" ]; then ac=$fc as=$fs bc=$sc bs=$ss; else ac=$sc as=$ss bc=$fc bs=$fs; fi
  ratio=$(awk -v a="$ac" -v b="$bc" 'BEGIN { printf "%.2f", b/a }')
  ratios+=("$ratio")
  echo "pair $i ($clients clients): A $ac ms, $as switches per reading; B $bc ms, $bs switches; B ÷ A $ratio"
done
median=$(printf '%s\n' "${ratios[@]}" | sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2 }')
echo "A = $a; B = $b; CPU per reading, B ÷ A, median of $pairs pairs: $median"
