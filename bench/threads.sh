#!/usr/bin/env bash
# How the proxy's throughput follows its serving threads: one proxy each with
# --threads 1, 2 and $(nproc) (the same counts once), in front of a one-server
# dev cluster (pgbench_accounts sharded by aid, the other pgbench tables on
# pg1, scale 10), pgbench -c 16 -j 2 in extended mode, interleaved rounds
# (each round runs every proxy once per workload, starting one later than
# the round before), with Postgres directly as a reference. Prints the median tps per thread count
# and its ratio to 1 thread. Workloads: `select` (pgbench -S) and `tpcb`
# (pgbench's builtin TPC-B-like transaction). Machines are shared and noisy:
# compare ratios within one run only.
#
# Env: CLIENTS (pgbench -c, default 16), MODE (pgbench -M, default extended).
#
# Usage: bench/threads.sh [SECONDS_PER_RUN] [ROUNDS] [WORKLOADS]
#   defaults: 10 3 "select tpcb"
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
rounds=${2:-3}
workloads=${3:-"select tpcb"}
clients=${CLIENTS:-16}
mode=${MODE:-extended}
for w in $workloads; do
  case "$w" in select|tpcb) ;; *) echo "unknown workload $w: select or tpcb" >&2; exit 2 ;; esac
done

. bench/lib.sh
bench_cluster shardline-threads
bench_pgbench_schema 10

counts=$(printf '%s\n' 1 2 "$(nproc)" | sort -nu)
pids=()
names=(direct)
ports=("$pg_port")
for n in $counts; do
  port=$(free_port)
  SHARDLINE_LOG=warn "$bin/shardline-proxy" --etcd "$etcd" --listen "127.0.0.1:$port" --auth-method trust \
    --threads "$n" > "$work/proxy-$n.log" 2>&1 &
  pids+=($!)
  names+=("$n")
  ports+=("$port")
done
trap 'kill "${pids[@]}" 2>/dev/null; bench_cleanup' EXIT
sleep 1

run() { # workload target port -> appends tps or "fail" to $work/<workload>.<target>
  local flag=""
  [ "$1" = select ] && flag="-S"
  # shellcheck disable=SC2086
  pgbench_tps "$work/$1.$2" -n $flag -M "$mode" -c "$clients" -j 2 -T "$secs" -h 127.0.0.1 -p "$3" -U postgres postgres
}

for round in $(seq 0 $((rounds - 1))); do
  for w in $workloads; do
    for i in $(round_order "$round" "${#names[@]}"); do run "$w" "${names[$i]}" "${ports[$i]}"; done
  done
done

echo "proxy --threads N: pgbench -M $mode -c $clients -j 2, ${secs}s per run, $rounds interleaved rounds, median tps, $(nproc) cores"
printf "%-9s %8s %12s %12s %12s\n" workload threads tps "vs 1 thread" proxy/direct
for w in $workloads; do
  d=$(median_of "$work/$w.direct")
  one=$(median_of "$work/$w.1")
  printf "%-9s %8s %12s %12s %12s\n" "$w" direct "$d" "" ""
  for n in $counts; do
    t=$(median_of "$work/$w.$n")
    printf "%-9s %8s %12s %12s %12s\n" "$w" "$n" "$t" "$(ratio "$t" "$one")" "$(ratio "$t" "$d")"
  done
  for n in direct $counts; do
    f="$work/$w.$n"
    fails=$(grep -c fail "$f" || true)
    if [ "$fails" -gt 0 ]; then echo "  $n: $fails/$rounds runs failed: $(tr '\n' ' ' < "$f.err")"; fi
  done
done
