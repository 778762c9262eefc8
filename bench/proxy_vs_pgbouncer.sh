#!/usr/bin/env bash
# pgbench -S -c 16 -j 2 against one Postgres directly, through pgbouncer
# (transaction pooling) and through the shardline proxy, interleaved in one
# run, for the simple, extended and prepared protocol modes. Prints the median
# tps of each and the ratios proxy/direct and proxy/pgbouncer. A second proxy
# with kept statements turned off (`prepare_unnamed_after` and
# `prepare_simple_after` = 0) shows what they bring. Machines are shared and
# noisy: compare ratios within one run only.
#
# WORKLOAD `select` is pgbench -S (one SELECT per transaction); `tpcb` is
# pgbench -N (BEGIN; UPDATE; SELECT; INSERT; END: a multi-statement
# transaction). With BASELINE_PROXY set to another shardline-proxy binary
# (say, built from an earlier commit), it runs in the same rounds and the
# last column is proxy/baseline: a regression check that the machine's noise
# affects equally.
#
# Usage: [BASELINE_PROXY=path] bench/proxy_vs_pgbouncer.sh [SECONDS_PER_RUN] [ROUNDS] [MODES] [WORKLOAD]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
rounds=${2:-3}
modes=${3:-"simple extended prepared"}
workload=${4:-select}
case "$workload" in
  select) pgbench_flags="-S" ;;
  tpcb) pgbench_flags="-N" ;;
  *) echo "unknown workload $workload: select or tpcb" >&2; exit 2 ;;
esac
clients=16

. bench/lib.sh
ensure_pgbouncer
bench_cluster shardline-bench
bench_pgbench_schema 10
start_proxy
start_pgbouncer 1000
# The same proxy without kept statements, for comparison.
unkept_port=$(free_port)
printf '[pool]\nprepare_unnamed_after = 0\nprepare_simple_after = 0\n' > "$work/unkept.toml"
SHARDLINE_LOG=warn "$bin/shardline-proxy" --config "$work/unkept.toml" --etcd "$etcd" \
  --listen "127.0.0.1:$unkept_port" --auth-method trust > "$work/unkept.log" 2>&1 &
unkept_pid=$!
start_baseline
trap 'kill $unkept_pid $baseline_pid 2>/dev/null; bench_cleanup' EXIT

run() { # target port mode -> tps or "fail"
  local out
  if out=$(pgbench -n $pgbench_flags -M "$3" -c $clients -j 2 -T "$secs" -h 127.0.0.1 -p "$2" -U postgres postgres 2>&1); then
    echo "$out" | awk '/^tps = / {print $3}' | head -1
  else
    echo "fail"
  fi
}

printf "pgbench %s -c %d -j 2, %ss per run, %d interleaved rounds, median tps\n" "$pgbench_flags" $clients "$secs" "$rounds"
header="%-9s %10s %10s %10s %13s %16s %14s %17s"
columns=(mode direct pgbouncer proxy proxy/direct proxy/pgbouncer "proxy(unkept)" unkept/pgbouncer)
files=(direct bouncer.tps proxy.tps unkept.tps)
ports=("$pg_port" "$bouncer_port" "$proxy_port" "$unkept_port")
if [ -n "$baseline_pid" ]; then
  header="$header %10s %15s"
  columns+=(baseline proxy/baseline)
  files+=(baseline.tps)
  ports+=("$baseline_port")
fi
# shellcheck disable=SC2059
printf "$header\n" "${columns[@]}"
for mode in $modes; do
  for f in "${files[@]}"; do : > "$work/$f"; done
  # Each round starts one target later than the round before (`round_order`).
  for round in $(seq 0 $((rounds - 1))); do
    for i in $(round_order "$round" "${#files[@]}"); do run "${files[$i]}" "${ports[$i]}" "$mode" >> "$work/${files[$i]}"; done
  done
  d=$(median_of "$work/direct")
  b=$(median_of "$work/bouncer.tps")
  p=$(median_of "$work/proxy.tps")
  u=$(median_of "$work/unkept.tps")
  row=("$mode" "$d" "$b" "$p" "$(ratio "$p" "$d")" "$(ratio "$p" "$b")" "$u" "$(ratio "$u" "$b")")
  if [ -n "$baseline_pid" ]; then
    l=$(median_of "$work/baseline.tps")
    row+=("$l" "$(ratio "$p" "$l")")
  fi
  # shellcheck disable=SC2059
  printf "$header\n" "${row[@]}"
done
