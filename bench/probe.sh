#!/usr/bin/env bash
# Where the time goes, on equal CPU: starts a server pinned to core 0, attaches a perf tool to it,
# runs `loadgen measure` pinned to core 1, and prints the tool's summary. BENCHMARKS.md's
# breakdown ("Where the time goes at 100 clients") was measured with it.
#
#   bench/probe.sh KIND TOOL READINGS [CLIENTS]
#     KIND   all (k3sense all) | trio (k3sense broker + gateway, both on core 0) | mosquitto
#     TOOL   stat (perf stat per thread: CPU, context switches) | trace (perf trace -s: system
#            calls per thread) | record (perf record; PERF_CG=-g for frame pointers) | none
#   System calls per reading: run READINGS=20 and 220 and divide the difference by 200, so that
#   start-up and connecting cancel out (bench/per_reading.py does it).
#
# Needs perf (Debian: linux-perf), taskset, curl, Mosquitto; build first with
# `cargo build --release -p k3sense -p loadgen` (K3SENSE_BIN, LOADGEN_BIN pick other binaries).
set -euo pipefail
cd "$(dirname "$0")/.."
kind=$1 tool=$2 readings=$3 clients=${4:-100}
K=${K3SENSE_BIN:-target/release/k3sense}
L=${LOADGEN_BIN:-target/release/loadgen}
W=${PROBE_DIR:-target/probe}; mkdir -p $W
base=$(( 20000 + (RANDOM % 5000) * 2 ))
mq=127.0.0.1:$base; http=127.0.0.1:$((base+1))
pids=()
cleanup() { for p in "${pids[@]}"; do kill $p 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
waitready() { for i in $(seq 1 400); do curl -sf http://$1/readyz >/dev/null 2>&1 && return 0; sleep 0.05; done; echo "not ready" >&2; exit 1; }
waitport() { for i in $(seq 1 400); do (exec 3<>/dev/tcp/${1%:*}/${1#*:}) 2>/dev/null && return 0; sleep 0.05; done; exit 1; }
case $kind in
  all) taskset -c 0 $K all --mqtt-listen $mq --http-listen $http --interval 1h > $W/all.log 2>&1 & pids+=($!); waitready $http
       proto=k3sense; path=/ws; ws=$http ;;
  trio) taskset -c 0 $K broker --listen $mq > $W/broker.log 2>&1 & pids+=($!); waitport $mq
       taskset -c 0 $K gateway --broker $mq --listen $http > $W/gateway.log 2>&1 & pids+=($!); waitready $http
       proto=k3sense; path=/ws; ws=$http ;;
  mosquitto) printf 'per_listener_settings false\nallow_anonymous true\npersistence false\nlistener %s 127.0.0.1\nlistener %s 127.0.0.1\nprotocol websockets\n' $base $((base+1)) > $W/m.conf
       taskset -c 0 /usr/sbin/mosquitto -c $W/m.conf > $W/m.log 2>&1 & pids+=($!); waitport $mq; waitport $http
       proto=mqtt; path=/; ws=$http ;;
esac
plist=$(IFS=,; echo "${pids[*]}")
case $tool in
  trace) perf trace -s -p $plist -o $W/out.txt & tp=$! ;;
  stat) perf stat -e task-clock,context-switches,cpu-migrations --per-thread -p $plist -o $W/out.txt & tp=$! ;;
  record) perf record -F 4000 ${PERF_CG:---call-graph dwarf,16384} -p $plist -o $W/perf.data > /dev/null 2>&1 & tp=$! ;;
  none) tp= ;;
esac
sleep 0.5
pidargs=(); for p in "${pids[@]}"; do pidargs+=(--pid $p); done
taskset -c 1 $L measure --protocol $proto --ws $ws --path $path --mqtt $mq "${pidargs[@]}" --clients $clients --readings $readings --rate 20
if [ -n "$tp" ]; then kill -INT $tp; wait $tp || true; fi
[ "$tool" = trace -o "$tool" = stat ] && cat $W/out.txt || true
echo "pids: ${pids[*]}"
