#!/usr/bin/env bash
# Each pooler's own CPU per transaction: pgbench's TPC-B-like transaction
# (-c 16 -j 2, scale 10, one Postgres) through the proxy, pgbouncer
# (transaction pooling) and PgCat (when a build is found), interleaved round
# by round; for each run the pooler process's user and system time
# (/proc/<pid>/stat, all threads) divided by the transactions pgbench
# completed. Prints the medians per mode. With the machine CPU-bound, a
# pooler's tps is bounded by what its own CPU per transaction adds to the
# server's and pgbench's (see docs/PERFORMANCE.md). pgbouncer 1.18 cannot run
# -M prepared in transaction pooling: its cells then read `fail`.
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
check_modes "$modes"
ensure_pgbouncer
pgcat_bin=$(pgcat_binary)
bench_cluster shardline-pooler-cpu
bench_pgbench_schema 10
# shellcheck disable=SC2119 # no config file: the defaults
start_proxy
start_pgbouncer 1000
start_baseline
names=(proxy pgbouncer)
ports=("$proxy_port" "$bouncer_port")
pids=("$proxy_pid" "$bouncer_pid")
if [ -n "$baseline_port" ]; then
  names+=(baseline); ports+=("$baseline_port"); pids+=("$baseline_pid")
fi
if [ -n "$pgcat_bin" ] && start_pgcat "$pgcat_bin"; then
  names+=(pgcat); ports+=("$pgcat_port"); pids+=("$pgcat_pid")
fi
sleep 1

# user and system clock ticks of PID, all threads
ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

run() { # name port pid mode -> appends "tps user_us sys_us" (or fail) to a file
  local out u0 s0 u1 s1 tx tps
  read -r u0 s0 < <(ticks "$3")
  if ! out=$(pgbench -n -M "$4" -c 16 -j 2 -T "$secs" -h 127.0.0.1 -p "$2" -U postgres postgres 2>&1) \
    || [[ "$out" != *$'\ntps = '* ]] || [[ "$out" == *"aborted"* ]]; then
    echo fail >> "$work/$1.$4"
    return
  fi
  read -r u1 s1 < <(ticks "$3")
  tx=$(awk -F': ' '/number of transactions actually processed/ {split($2, a, "/"); print a[1]}' <<< "$out")
  tps=$(awk '/^tps = / {print $3; exit}' <<< "$out")
  python3 -c "import sys; u0,s0,u1,s1,tx,hz=map(float,sys.argv[1:7]); print(sys.argv[7], (u1-u0)*1e6/hz/tx, (s1-s0)*1e6/hz/tx)" \
    "$u0" "$s0" "$u1" "$s1" "$tx" "$hz" "$tps" >> "$work/$1.$4"
}

for _ in $(seq "$rounds"); do
  for mode in $modes; do
    for i in "${!names[@]}"; do run "${names[$i]}" "${ports[$i]}" "${pids[$i]}" "$mode"; done
  done
done

echo "pooler CPU per TPC-B-like transaction: pgbench -c 16 -j 2, ${secs}s per run, $rounds interleaved rounds, medians; $(nproc) cores"
printf "%-9s %-10s %8s %14s %14s %14s\n" mode pooler tps "user us/tx" "sys us/tx" "user+sys"
for mode in $modes; do
  for n in "${names[@]}"; do
    python3 - "$work/$n.$mode" "$mode" "$n" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip() and l.strip() != "fail"]
if not rows:
    print(f"{sys.argv[2]:9s} {sys.argv[3]:10s} {'fail':>8s}")
    sys.exit()
tps, user, sys_ = (statistics.median(float(r[i]) for r in rows) for i in range(3))
print(f"{sys.argv[2]:9s} {sys.argv[3]:10s} {tps:8.0f} {user:14.1f} {sys_:14.1f} {user + sys_:14.1f}")
PY
  done
done
