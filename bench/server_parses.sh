#!/usr/bin/env bash
# What the server parses per transaction: pgbench's TPC-B-like transaction
# (-c 4 -j 1, scale 10, one Postgres) directly and through the proxy (and
# through BASELINE_PROXY, another shardline-proxy binary, when set), with
# Postgres logging every protocol step (log_min_duration_statement = 0).
# Per transaction it prints the simple Queries the server ran, the Parses
# (of the unnamed statement and of named ones) and the Binds. A statement
# the proxy keeps prepared costs the server a Bind and an Execute, not a
# parse and a plan; the first uses on each connection parse it once.
# This counts, it does not time: the log costs far more than the work.
#
# Usage: [BASELINE_PROXY=path] bench/server_parses.sh [TRANSACTIONS_PER_CLIENT] [MODES]
#   defaults: 200 "simple extended prepared"
set -euo pipefail
cd "$(dirname "$0")/.."
per_client=${1:-200}
modes=${2:-"simple extended prepared"}
. bench/lib.sh
check_modes "$modes"
bench_cluster shardline-parses
bench_pgbench_schema 10
# shellcheck disable=SC2119 # no config file: the defaults
start_proxy
start_baseline
trap 'if [ -n "$baseline_pid" ]; then kill "$baseline_pid" 2>/dev/null; fi; bench_cleanup' EXIT
add_target direct "$pg_port" -
add_target proxy "$proxy_port" "$proxy_pid"
if [ -n "$baseline_port" ]; then add_target baseline "$baseline_port" "$baseline_pid"; fi
sleep 1

datadir=$(psql -X -At -h 127.0.0.1 -p "$pg_port" -U postgres postgres -c "SELECT current_setting('data_directory')")
log="$datadir.log" # where `shardctl dev up` has pg_ctl write the server's log
psql -X -q -h 127.0.0.1 -p "$pg_port" -U postgres postgres \
  -c "ALTER SYSTEM SET log_min_duration_statement = 0" -c "SELECT pg_reload_conf()" >/dev/null
sleep 1

echo "server work per TPC-B-like transaction: pgbench -c 4 -j 1 -t $per_client, Postgres's log of every step"
printf "%-9s %-9s %8s %10s %14s %12s %8s\n" mode target tx queries "unnamed parses" "named parses" binds
for mode in $modes; do
  for i in "${!names[@]}"; do
    : > "$log"
    if ! out=$(pgbench -n -M "$mode" -c 4 -j 1 -t "$per_client" -h 127.0.0.1 -p "${ports[$i]}" -U postgres postgres 2>&1); then
      printf "%-9s %-9s %8s\n" "$mode" "${names[$i]}" fail
      continue
    fi
    tx=$(pgbench_transactions "$out")
    # Lines such as "duration: 0.012 ms  parse <unnamed>: ..." and
    # "duration: 0.020 ms  statement: ...".
    awk -v mode="$mode" -v name="${names[$i]}" -v tx="$tx" '
      /duration: [0-9.]+ ms  statement: / {q++}
      /duration: [0-9.]+ ms  parse <unnamed>: / {u++}
      /duration: [0-9.]+ ms  parse [^<]/ {n++}
      /duration: [0-9.]+ ms  bind / {b++}
      END {printf "%-9s %-9s %8d %10.2f %14.2f %12.2f %8.2f\n", mode, name, tx, q / tx, u / tx, n / tx, b / tx}' "$log"
  done
done
