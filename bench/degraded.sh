#!/usr/bin/env bash
# What degraded mode costs: two proxies in front of the same one-server dev
# cluster (pgbench_accounts sharded by aid into 16 leaves, the other pgbench
# tables on pg1, scale 10); one reaches etcd directly (normal mode), the other through a
# TCP forwarder that is then stopped (SIGSTOP), so it serves in degraded
# mode, every request proving ownership on the server first. pgbench -c 16
# -j 2 in simple, extended and prepared modes, interleaved rounds (each
# round runs both proxies once per workload and mode, the first of the two
# taking turns: `round_order` in lib.sh).
# Prints the median tps of each and the ratio degraded/normal, plus the
# extra time per transaction that ratio means (16 clients / tps).
# Workloads: `select` (pgbench -S: one checked statement) and `tpcb`
# (pgbench's TPC-B-like transaction: its accounts statements are checked
# once, with the first; tellers, branches and history are unsharded).
# Machines are shared and noisy: compare ratios within one run only.
#
# Usage: bench/degraded.sh [SECONDS_PER_RUN] [ROUNDS] [MODES] [WORKLOADS]
#   defaults: 5 3 "simple extended prepared" "select tpcb"
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
rounds=${2:-3}
modes=${3:-"simple extended prepared"}
workloads=${4:-"select tpcb"}
clients=16

. bench/lib.sh
bench_cluster shardline-degraded
bench_pgbench_schema 10
# The check looks for a partition's leaf: pgbench_accounts becomes a
# partitioned table with one leaf per partition, as `shardctl table create`
# makes it (which also installs the check function).
psql_pg() { psql -q -h 127.0.0.1 -p "$pg_port" -U postgres -d postgres -v ON_ERROR_STOP=1 "$@" >/dev/null; }
psql_pg -c "ALTER TABLE pgbench_accounts RENAME TO pgbench_accounts_plain"
"$bin/shardctl" table create pgbench_accounts \
  --columns "aid int NOT NULL PRIMARY KEY, bid int, abalance int, filler char(84)" >/dev/null
psql_pg -c "INSERT INTO pgbench_accounts SELECT * FROM pgbench_accounts_plain" \
  -c "DROP TABLE pgbench_accounts_plain" -c "VACUUM ANALYZE pgbench_accounts"

# A forwarder to etcd for the degraded proxy.
forward_port=$(free_port)
python3 - "$forward_port" "${etcd#http://}" <<'EOF' > "$work/forwarder.log" 2>&1 &
import asyncio, sys
port = int(sys.argv[1]); host, target_port = sys.argv[2].rsplit(":", 1)
async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()
async def handle(reader, writer):
    up_reader, up_writer = await asyncio.open_connection(host, int(target_port))
    await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()
asyncio.run(main())
EOF
forwarder_pid=$!

normal_port=$(free_port)
degraded_port=$(free_port)
degraded_metrics=$(free_port)
SHARDLINE_LOG=warn "$bin/shardline-proxy" --etcd "$etcd" --listen "127.0.0.1:$normal_port" \
  --auth-method trust > "$work/normal.log" 2>&1 &
normal_pid=$!
SHARDLINE_LOG=warn "$bin/shardline-proxy" --etcd "http://127.0.0.1:$forward_port" \
  --listen "127.0.0.1:$degraded_port" --metrics-listen "127.0.0.1:$degraded_metrics" \
  --auth-method trust > "$work/degraded.log" 2>&1 &
degraded_pid=$!
trap 'kill -CONT "$forwarder_pid" 2>/dev/null; kill "$normal_pid" "$degraded_pid" "$forwarder_pid" 2>/dev/null; bench_cleanup' EXIT

metric() { curl -s "http://127.0.0.1:$degraded_metrics/metrics" | awk -v n="$1" '$1 == n {print $2+0}'; }
for _ in $(seq 100); do
  [ "$(metric shardline_degraded)" = 0 ] && break
  sleep 0.2
done
[ "$(metric shardline_degraded)" = 0 ] || { echo "the second proxy did not start serving" >&2; exit 1; }
kill -STOP "$forwarder_pid"
for _ in $(seq 150); do
  [ "$(metric shardline_degraded)" = 1 ] && break
  sleep 0.2
done
[ "$(metric shardline_degraded)" = 1 ] || { echo "the second proxy did not enter degraded mode" >&2; exit 1; }

run() { # workload mode name port
  local flag=""
  [ "$1" = select ] && flag="-S"
  # shellcheck disable=SC2086
  pgbench_tps "$work/$1.$2.$3" -n $flag -M "$2" -c "$clients" -j 2 -T "$secs" -h 127.0.0.1 -p "$4" -U postgres postgres
}

targets=(normal degraded)
target_ports=("$normal_port" "$degraded_port")
for round in $(seq 0 $((rounds - 1))); do
  for w in $workloads; do
    for m in $modes; do
      for i in $(round_order "$round" 2); do run "$w" "$m" "${targets[$i]}" "${target_ports[$i]}"; done
    done
  done
done
[ "$(metric shardline_degraded)" = 1 ] || echo "warning: the second proxy left degraded mode during the run" >&2

echo "degraded vs normal mode: pgbench -c $clients -j 2, ${secs}s per run, $rounds interleaved rounds, median tps, $(nproc) cores"
echo "ownership checks run: $(metric shardline_owner_checks_total), failed: $(metric shardline_owner_check_failures_total)"
printf "%-8s %-9s %10s %10s %16s %22s\n" workload mode normal degraded degraded/normal "extra ms/transaction"
for w in $workloads; do
  for m in $modes; do
    n=$(median_of "$work/$w.$m.normal")
    d=$(median_of "$work/$w.$m.degraded")
    extra=$(python3 -c "import sys; n,d,c=sys.argv[1:]; print('n/a' if 'fail' in (n,d) else '%.3f' % (1000*int(c)/float(d) - 1000*int(c)/float(n)))" "$n" "$d" "$clients")
    printf "%-8s %-9s %10s %10s %16s %22s\n" "$w" "$m" "$n" "$d" "$(ratio "$d" "$n")" "$extra"
    for p in normal degraded; do
      f="$work/$w.$m.$p"
      fails=$(grep -c fail "$f" || true)
      if [ "$fails" -gt 0 ]; then echo "  $p: $fails/$rounds runs failed: $(tr '\n' ' ' < "$f.err")"; fi
    done
  done
done
