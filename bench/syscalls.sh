#!/usr/bin/env bash
# System calls and context switches a pooler makes per transaction:
# pgbench's TPC-B-like transaction (or -S) (-c 16 -j 2, scale 10, one Postgres)
# through the proxy, BASELINE_PROXY (another shardline-proxy binary, if
# set), pgbouncer (not in prepared mode, which it cannot run in transaction
# pooling) and PgCat (when a build is found), interleaved round by round.
# `perf stat` counts the pooler process's sendto, recvfrom, epoll_wait,
# io_uring_enter (the proxy's gathered sends: one per pass of an event loop)
# and write calls (a write is an event loop woken through its eventfd) and
# its context switches, voluntary or not, over each run; each count is divided by the
# transactions pgbench completed, and the medians are printed. On loopback,
# a pooler's work per transaction is mostly these calls (see
# docs/PERFORMANCE.md, "Where a transaction's time goes").
#
# Needs perf (Debian package linux-perf) and the right to trace (root, or
# kernel.perf_event_paranoid <= 1 with access to the tracepoints).
#
# Usage: [BASELINE_PROXY=path [BASELINE_CONFIG=file]] bench/syscalls.sh [SECONDS_PER_RUN] [ROUNDS] [MODE] [WORKLOAD]
#   defaults: 8 3 prepared tpcb; WORKLOAD select runs pgbench -S instead
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-8}
rounds=${2:-3}
mode=${3:-prepared}
workload=${4:-tpcb}
case "$workload" in
  tpcb) workload_flag=() workload_name="TPC-B-like transaction" ;;
  select) workload_flag=(-S) workload_name="pgbench -S transaction" ;;
  *) echo "unknown workload $workload: tpcb or select" >&2; exit 2 ;;
esac
. bench/lib.sh
need_command perf linux-perf
start_tpcb_targets shardline-syscalls "$mode"
events=syscalls:sys_enter_sendto,syscalls:sys_enter_recvfrom,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_io_uring_enter,syscalls:sys_enter_write,context-switches
if ! perf stat -e "$events" -p "$proxy_pid" -o /dev/null -- sleep 0.1 2>"$work/perf.err"; then
  echo "perf cannot count system calls here: $(head -1 "$work/perf.err")" >&2
  exit 2
fi

run() { # name port pid -> appends "sendto recvfrom epoll_wait io_uring_enter write switches" per transaction
  local out tx
  perf stat -x, -e "$events" -p "$3" -o "$work/$1.stat" -- sleep $((secs + 1)) &
  local perf_pid=$!
  sleep 0.5
  if ! out=$(pgbench -n "${workload_flag[@]}" -M "$mode" -c 16 -j 2 -T "$secs" -h 127.0.0.1 -p "$2" -U postgres postgres 2>&1) \
    || [[ "$out" == *"aborted"* ]]; then
    wait "$perf_pid" || true
    echo fail >> "$work/$1.counts"
    return
  fi
  wait "$perf_pid"
  tx=$(pgbench_transactions "$out")
  python3 - "$work/$1.stat" "$tx" >> "$work/$1.counts" <<'PY'
import sys
counts = {}
for line in open(sys.argv[1]):
    fields = line.strip().split(",")
    if len(fields) > 2 and fields[0].isdigit():
        counts[fields[2]] = int(fields[0])
tx = float(sys.argv[2])
names = ["syscalls:sys_enter_sendto", "syscalls:sys_enter_recvfrom", "syscalls:sys_enter_epoll_wait", "syscalls:sys_enter_io_uring_enter", "syscalls:sys_enter_write", "context-switches"]
print(" ".join("%.2f" % (counts.get(n, 0) / tx) for n in names))
PY
}

for round in $(seq 0 $((rounds - 1))); do
  for i in $(round_order "$round" "${#names[@]}"); do run "${names[$i]}" "${ports[$i]}" "${pids[$i]}"; done
done

echo "pooler system calls per $workload_name: pgbench${workload_flag[*]:+ ${workload_flag[*]}} -M $mode -c 16 -j 2, ${secs}s per run, $rounds interleaved rounds, medians; $(nproc) cores"
printf "%-10s %10s %10s %12s %10s %10s %12s\n" pooler sendto recvfrom epoll_wait io_uring write switches
for n in "${names[@]}"; do
  python3 - "$work/$n.counts" "$n" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip() and l.strip() != "fail"]
if not rows:
    print(f"{sys.argv[2]:10s} {'fail':>10s}")
    sys.exit()
cols = [statistics.median(float(r[i]) for r in rows) for i in range(6)]
print(f"{sys.argv[2]:10s} {cols[0]:10.2f} {cols[1]:10.2f} {cols[2]:12.2f} {cols[3]:10.2f} {cols[4]:10.2f} {cols[5]:12.2f}")
PY
done
