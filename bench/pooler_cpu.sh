#!/usr/bin/env bash
# Where a transaction's CPU goes: pgbench's TPC-B-like transaction (-c 16
# -j 2, scale 10, one Postgres) directly and through the proxy, pgbouncer
# (transaction pooling) and PgCat (when a build is found), interleaved round
# by round. For each run, divided by the transactions pgbench completed:
#   - the pooler process's user and system time (/proc/<pid>/stat, all threads);
#   - Postgres's (the postmaster and all its children, those that exited too);
#   - pgbench's own (its rusage);
#   - the machine's idle time and all of its time (/proc/stat, all cores),
#     and its softirq time, which the processes' system time already holds.
# Prints the medians per mode. With the machine CPU-bound, a pooler's tps is
# bounded by what its own CPU per transaction adds to the server's and
# pgbench's (see docs/PERFORMANCE.md). pgbouncer 1.18 cannot run -M prepared
# in transaction pooling: its cells then read `fail`.
#
# BASELINE_PROXY=path adds another shardline-proxy binary (say, an earlier
# commit's build) to the rounds.
#
# Usage: [PGCAT=path] [BASELINE_PROXY=path] bench/pooler_cpu.sh [SECONDS_PER_RUN] [ROUNDS] [MODES]
#   defaults: 8 3 "simple extended prepared"
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-8}
rounds=${2:-3}
modes=${3:-"simple extended prepared"}
. bench/lib.sh
start_tpcb_targets shardline-pooler-cpu "$modes" direct

# user and system clock ticks of PID, all threads ("-": none)
ticks() { if [ "$1" = - ]; then echo 0 0; else awk '{print $14, $15}' "/proc/$1/stat"; fi; }
hz=$(getconf CLK_TCK)
postmaster=$(head -1 "$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['servers'][0]['data_dir'])" "$work/dev.json")/postmaster.pid")
# Postgres's clock ticks: the postmaster's own and its exited children's
# (direct pgbench connections end with the run), plus its live children's.
pg_ticks() {
  local p
  { awk '{print $14 + $15 + $16 + $17}' "/proc/$postmaster/stat"
    for p in $(pgrep -P "$postmaster"); do awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || true; done
  } | awk '{t += $1} END {print t + 0}'
}
# the machine's softirq (with irq), idle (with iowait) and all ticks, all cores
machine_ticks() { awk '/^cpu / {print $7 + $8, $5 + $6, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9}' /proc/stat; }

run() { # name port pid mode -> appends "tps user_us sys_us postgres_us pgbench_us softirq_us idle_us machine_us" (or fail) to a file
  local out u0 s0 u1 s1 g0 g1 q0 i0 m0 q1 i1 m1 tx tps cpu
  read -r u0 s0 < <(ticks "$3")
  g0=$(pg_ticks)
  read -r q0 i0 m0 < <(machine_ticks)
  # pgbench's own CPU is its rusage, which python reads after it exits.
  if ! out=$(python3 -c 'import resource, subprocess, sys
r = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
u = resource.getrusage(resource.RUSAGE_CHILDREN)
print(r.stdout)
print("pgbench cpu = %f" % (u.ru_utime + u.ru_stime))
sys.exit(r.returncode)' pgbench -n -M "$4" -c 16 -j 2 -T "$secs" -h 127.0.0.1 -p "$2" -U postgres postgres) \
    || [[ "$out" != *$'\ntps = '* ]] || [[ "$out" == *"aborted"* ]]; then
    echo fail >> "$work/$1.$4"
    return
  fi
  read -r u1 s1 < <(ticks "$3")
  g1=$(pg_ticks)
  read -r q1 i1 m1 < <(machine_ticks)
  tx=$(pgbench_transactions "$out")
  tps=$(awk '/^tps = / {print $3; exit}' <<< "$out")
  cpu=$(awk '/^pgbench cpu = / {print $4}' <<< "$out")
  python3 -c "import sys
u0,s0,u1,s1,g0,g1,q0,q1,i0,i1,m0,m1,tx,hz,cpu=map(float,sys.argv[1:16])
us = lambda ticks: ticks * 1e6 / hz / tx
print(sys.argv[16], us(u1-u0), us(s1-s0), us(g1-g0), cpu * 1e6 / tx, us(q1-q0), us(i1-i0), us(m1-m0))" \
    "$u0" "$s0" "$u1" "$s1" "$g0" "$g1" "$q0" "$q1" "$i0" "$i1" "$m0" "$m1" "$tx" "$hz" "$cpu" "$tps" >> "$work/$1.$4"
}

for round in $(seq 0 $((rounds - 1))); do
  for mode in $modes; do
    for i in $(round_order "$round" "${#names[@]}"); do run "${names[$i]}" "${ports[$i]}" "${pids[$i]}" "$mode"; done
  done
done

echo "CPU per TPC-B-like transaction, µs: pgbench -c 16 -j 2, ${secs}s per run, $rounds interleaved rounds, medians; $(nproc) cores"
echo "(pooler: its user and system time; postgres, pgbench: user+system; idle, machine (busy or idle): all cores; other: machine less the rest;"
echo " softirq: the machine's, already inside the processes' system time: loopback TCP delivers a packet in the sender's context)"
printf "%-9s %-10s %8s %8s %8s %8s %9s %8s %8s %8s %8s %8s\n" mode target tps "pooler u" "pooler s" pooler postgres pgbench softirq idle other machine
for mode in $modes; do
  for n in "${names[@]}"; do
    python3 - "$work/$n.$mode" "$mode" "$n" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip() and l.strip() != "fail"]
if not rows:
    print(f"{sys.argv[2]:9s} {sys.argv[3]:10s} {'fail':>8s}")
    sys.exit()
tps, user, sys_, pg, bench, softirq, idle, machine = (statistics.median(float(r[i]) for r in rows) for i in range(8))
other = machine - (user + sys_ + pg + bench + idle)
print(f"{sys.argv[2]:9s} {sys.argv[3]:10s} {tps:8.0f} {user:8.1f} {sys_:8.1f} {user + sys_:8.1f} {pg:9.1f} {bench:8.1f} {softirq:8.1f} {idle:8.1f} {other:8.1f} {machine:8.1f}")
PY
  done
done
