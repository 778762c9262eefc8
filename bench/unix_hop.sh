#!/usr/bin/env bash
# What the pooler-to-server hop's transport is worth on one host: two
# pgbouncers (transaction pooling, 20 server connections) in front of one
# Postgres, one reaching it over loopback TCP, the other over Postgres's
# Unix socket; pgbench reaches both over TCP. pgbench -c 16 -j 2 runs the
# TPC-B-like transaction through each, interleaved round by round; prints the
# median tps of each and unix/tcp, with each round's own ratio.
# The proxy reaches its servers over TCP only (and PgCat cannot use a Unix
# socket at all): this is what Unix-socket server addresses would be worth to
# a pooler that runs on its server's host. pgbouncer 1.18 cannot run -M
# prepared in transaction pooling, so the modes are simple and extended.
#
# Usage: bench/unix_hop.sh [SECONDS_PER_RUN] [ROUNDS] [MODES]
#   defaults: 8 5 "simple extended"
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-8}
rounds=${2:-5}
modes=${3:-"simple extended"}
for mode in $modes; do
  case "$mode" in simple|extended) ;; *) echo "mode $mode: simple or extended (pgbouncer cannot run prepared)" >&2; exit 2 ;; esac
done
. bench/lib.sh
ensure_pgbouncer
bench_cluster shardline-unix-hop
bench_pgbench_schema 10
# Postgres's Unix socket is in its data directory in a dev cluster.
socket_dir=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['servers'][0]['data_dir'])" "$work/dev.json")

start_pgbouncer 100 127.0.0.1 bouncer-tcp
tcp_port=$bouncer_port
tcp_pid=$bouncer_pid
trap 'if [ -n "$tcp_pid" ]; then kill "$tcp_pid" 2>/dev/null; fi; bench_cleanup' EXIT
start_pgbouncer 100 "$socket_dir" bouncer-unix
unix_port=$bouncer_port

echo "pgbouncer reaching Postgres over loopback TCP and over its Unix socket: pgbench TPC-B-like -c 16 -j 2, ${secs}s per run, $rounds interleaved rounds, median tps; scale 10, $(nproc) cores"
printf "%-9s %10s %10s %10s\n" mode tcp unix unix/tcp
for mode in $modes; do
  for _ in $(seq "$rounds"); do
    pgbench_tps "$work/$mode.tcp" -n -M "$mode" -c 16 -j 2 -T "$secs" -h 127.0.0.1 -p "$tcp_port" -U postgres postgres
    pgbench_tps "$work/$mode.unix" -n -M "$mode" -c 16 -j 2 -T "$secs" -h 127.0.0.1 -p "$unix_port" -U postgres postgres
  done
  tcp=$(median_of "$work/$mode.tcp")
  unix=$(median_of "$work/$mode.unix")
  printf "%-9s %10s %10s %10s\n" "$mode" "$tcp" "$unix" "$(ratio "$unix" "$tcp")"
done
for mode in $modes; do
  paired_ratios "$work/$mode.unix" "$work/$mode.tcp" "  $mode unix/tcp"
  for side in tcp unix; do
    if grep -qs fail "$work/$mode.$side"; then echo "  $mode $side: $(tr '\n' ' ' < "$work/$mode.$side.err")"; fi
  done
done
