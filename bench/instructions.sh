#!/usr/bin/env bash
# The proxy's own work per transaction, in instructions: the proxy runs
# under valgrind's callgrind (one serving thread) while pgbench -c 4 -j 1
# runs N transactions per client through it; a warm-up runs first, then the
# counters are zeroed, so connecting, preparing and the map's first read are
# left out. BASELINE_PROXY=path measures another shardline-proxy binary (say,
# built from an earlier commit) the same way and adds proxy/baseline.
# Instructions are counted, not timed: the same binary and workload give the
# same count whatever else the machine does (within a fraction of a per
# cent: timers and the etcd watch run too). They count only user space: the
# system calls' own work (most of a pooler's CPU, see docs/PERFORMANCE.md)
# is not in them.
#
# Usage: [BASELINE_PROXY=path] bench/instructions.sh [TRANSACTIONS_PER_CLIENT] [MODES] [WORKLOADS]
#   defaults: 500 "simple extended prepared" "tpcb select"
set -euo pipefail
cd "$(dirname "$0")/.."
per_client=${1:-500}
modes=${2:-"simple extended prepared"}
workloads=${3:-"tpcb select"}
for w in $workloads; do
  case "$w" in tpcb|select) ;; *) echo "unknown workload $w: tpcb or select" >&2; exit 2 ;; esac
done
. bench/lib.sh
check_modes "$modes"
need_command valgrind valgrind
need_command callgrind_control valgrind
bench_cluster shardline-instructions
bench_pgbench_schema 10

binaries=(proxy "$bin/shardline-proxy")
if [ -n "${BASELINE_PROXY:-}" ]; then binaries+=(baseline "$BASELINE_PROXY"); fi
counted_pid=""
trap 'if [ -n "$counted_pid" ]; then kill "$counted_pid" 2>/dev/null; fi; bench_cleanup' EXIT

flags() { case "$1" in tpcb) echo "" ;; select) echo "-S" ;; esac; }

# Instructions per transaction of one binary in one workload and mode.
count() { # name binary workload mode
  local port out total
  port=$(free_port)
  out="$work/callgrind.$1.$3.$4"
  SHARDLINE_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$out" \
    "$2" --etcd "$etcd" --listen "127.0.0.1:$port" --auth-method trust --threads 1 \
    > "$out.log" 2>&1 &
  counted_pid=$!
  wait_for_port "$port" 60 || { echo "$1 did not start under valgrind (log: $out.log)" >&2; exit 1; }
  # shellcheck disable=SC2046
  pgbench -n $(flags "$3") -M "$4" -c 4 -j 1 -t 20 -h 127.0.0.1 -p "$port" -U postgres postgres >/dev/null 2>&1
  callgrind_control -z "$counted_pid" >/dev/null 2>&1
  # shellcheck disable=SC2046
  if ! pgbench -n $(flags "$3") -M "$4" -c 4 -j 1 -t "$per_client" -h 127.0.0.1 -p "$port" -U postgres postgres \
    > "$out.pgbench" 2>&1; then
    echo "$1 $3 $4: pgbench failed: $(tail -2 "$out.pgbench" | tr '\n' ' ')" >&2
    echo fail
  else
    callgrind_control -d "$counted_pid" >/dev/null 2>&1
    # The dump is the newest of the numbered files callgrind writes.
    total=$(awk '/^summary:/ {print $2}' "$(ls -t "$out".[0-9]* | head -1)")
    echo $((total / (4 * per_client)))
  fi
  kill "$counted_pid" 2>/dev/null || true
  wait "$counted_pid" 2>/dev/null || true
  counted_pid=""
}

echo "proxy instructions per transaction (user space, callgrind): pgbench -c 4 -j 1 -t $per_client, one serving thread, scale 10"
header=(workload mode)
for ((i = 0; i < ${#binaries[@]}; i += 2)); do header+=("${binaries[$i]}"); done
[ ${#binaries[@]} -gt 2 ] && header+=(proxy/baseline)
fmt="%-9s %-9s"; for _ in "${header[@]:2}"; do fmt="$fmt %15s"; done
# shellcheck disable=SC2059
printf "$fmt\n" "${header[@]}"
for w in $workloads; do
  for mode in $modes; do
    row=("$w" "$mode")
    for ((i = 0; i < ${#binaries[@]}; i += 2)); do row+=("$(count "${binaries[$i]}" "${binaries[$((i + 1))]}" "$w" "$mode")"); done
    [ ${#binaries[@]} -gt 2 ] && row+=("$(ratio "${row[2]}" "${row[3]}")")
    # shellcheck disable=SC2059
    printf "$fmt\n" "${row[@]}"
  done
done
