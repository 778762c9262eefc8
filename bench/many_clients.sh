#!/usr/bin/env bash
# Many more clients than server connections: `pgbench -n -S -j 2` with
# CLIENTS clients through the proxy (default pool of 20, default threads:
# one per core) on a one-server cluster, RUNS runs of SECONDS each. Prints,
# per run, how many clients pgbench aborted (each prints one error line) and
# the tps. A pooled client must wait its turn, never fail: any aborted
# client is a bug. BASELINE_PROXY=path adds the same runs through another
# proxy binary, interleaved (the first of the two taking turns: `round_order`
# in lib.sh).
#
# Usage: bench/many_clients.sh [CLIENTS] [RUNS] [SECONDS]    # defaults 100 3 10
set -euo pipefail
cd "$(dirname "$0")/.."
clients=${1:-100}
runs=${2:-3}
secs=${3:-10}
ulimit -n $((clients * 4 + 1024)) 2>/dev/null || true
. bench/lib.sh
bench_cluster shardline-many
bench_pgbench_schema 1
printf '[limits]\nmax_clients = %d\n' $((clients * 2 + 100)) > "$work/many.toml"
start_proxy "$work/many.toml"
start_baseline
sleep 1
echo "pgbench -n -S -c $clients -j 2 -T $secs through a pool of 20, proxy threads: ${SHARDLINE_PROXY_THREADS:-default}"
targets=(proxy ${baseline_port:+baseline})
ports=("$proxy_port" ${baseline_port:+"$baseline_port"})
for run in $(seq "$runs"); do
  for i in $(round_order $((run - 1)) "${#targets[@]}"); do
    target=${targets[$i]}
    port=${ports[$i]}
    out=$(pgbench -n -S -c "$clients" -j 2 -T "$secs" -h 127.0.0.1 -p "$port" -U postgres postgres 2>&1 || true)
    aborted=$(grep -c 'aborted' <<<"$out" || true)
    tps=$(grep -o 'tps = [0-9]*' <<<"$out" | grep -o '[0-9]*' || echo fail)
    printf '%-9s run %d: %4d of %d clients aborted, tps %s\n' "$target" "$run" "$aborted" "$clients" "$tps"
    grep -m1 'aborted' <<<"$out" | sed 's/^/          first: /' || true
  done
done
