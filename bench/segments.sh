#!/usr/bin/env bash
# TCP segments per transaction on loopback: pgbench's TPC-B-like transaction
# (-c 16 -j 2, scale 10, one Postgres) directly, through the proxy, through
# pgbouncer (not in prepared mode, which it cannot run in transaction
# pooling), through PgCat (when a build is found) and through BASELINE_PROXY
# (another shardline-proxy binary, when set). `nstat` counts the
# machine's TCP segments over each run (everything on the machine, etcd's
# few included), divided by the transactions pgbench completed. Directly a
# transaction is 7 requests and 7 replies: 14 segments; a pooler adds the
# segments of its hop. Pure ACKs (segments without data) are counted too:
# on request/reply traffic every ACK should ride on data.
#
# Needs nstat (Debian package iproute2).
#
# Usage: [BASELINE_PROXY=path] bench/segments.sh [SECONDS_PER_RUN] [MODE]    defaults: 8 prepared
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-8}
mode=${2:-prepared}
. bench/lib.sh
need_command nstat iproute2
start_tpcb_targets shardline-segments "$mode" direct

echo "TCP segments per TPC-B-like transaction: pgbench -M $mode -c 16 -j 2, ${secs}s per run, the whole machine"
printf "%-10s %8s %10s %10s %10s\n" target tps "out segs" "in segs" "pure acks"
for i in "${!names[@]}"; do
  args=(-n -M "$mode" -c 16 -j 2 -h 127.0.0.1 -p "${ports[$i]}" -U postgres postgres)
  # A short warm-up: connections opened, statements prepared.
  pgbench "${args[@]}" -T 2 >/dev/null 2>&1 || true
  nstat -n >/dev/null
  if ! out=$(pgbench "${args[@]}" -T "$secs" 2>&1); then
    printf "%-10s %8s\n" "${names[$i]}" fail
    continue
  fi
  tx=$(pgbench_transactions "$out")
  tps=$(awk '/^tps/ {printf "%d", $3}' <<< "$out")
  nstat -z 2>/dev/null | awk -v name="${names[$i]}" -v tx="$tx" -v tps="$tps" '
    $1 == "TcpOutSegs" {o = $2} $1 == "TcpInSegs" {n = $2} $1 == "TcpExtTCPPureAcks" {a = $2}
    END {printf "%-10s %8d %10.2f %10.2f %10.2f\n", name, tps, o / tx, n / tx, a / tx}'
done
