#!/usr/bin/env bash
# What the pooler-to-server hop's transport is worth on one host. In front
# of one Postgres: the proxy reaching it over loopback TCP and over its
# Unix-domain socket (`[pool.socket_dirs]`), pgbouncer (transaction pooling,
# 20 server connections) the same two ways, and PgCat when a build is found
# (it can reach servers over TCP only). pgbench always reaches the pooler
# over TCP. pgbench -c 16 -j 2 runs the TPC-B-like transaction through each,
# interleaved round by round; prints the median tps of each, the ratios, and
# each round's own ratios. pgbouncer 1.18 cannot run -M prepared in
# transaction pooling: its columns read "fail" there.
#
# The bench's headline comparisons (bench/workload.sh) keep every pooler on
# TCP; this one shows what running on the server's host through its socket
# is worth, pooler by pooler.
#
# Usage: bench/unix_hop.sh [SECONDS_PER_RUN] [ROUNDS] [MODES]
#   defaults: 8 5 "simple extended prepared"
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-8}
rounds=${2:-5}
modes=${3:-"simple extended prepared"}
. bench/lib.sh
check_modes "$modes"
ensure_pgbouncer
pgcat=$(pgcat_binary)
bench_cluster shardline-unix-hop
bench_pgbench_schema 10
# Postgres's Unix socket is in its data directory in a dev cluster.
read -r server_name socket_dir < <(python3 -c "import json,sys; s=json.load(open(sys.argv[1]))['servers'][0]; print(s['name'], s['data_dir'])" "$work/dev.json")

# The processes a second start of the same kind leaves out of bench_cleanup.
extra_pids=()
trap 'for p in "${extra_pids[@]}"; do kill "$p" 2>/dev/null || true; done; bench_cleanup' EXIT
# shellcheck disable=SC2119 # no config file: the defaults
start_proxy
add_target proxy-tcp "$proxy_port" "$proxy_pid"
extra_pids+=("$proxy_pid")
printf '[pool.socket_dirs]\n%s = "%s"\n' "$server_name" "$socket_dir" > "$work/unix.toml"
start_proxy "$work/unix.toml"
add_target proxy-unix "$proxy_port" "$proxy_pid"
start_pgbouncer 100 127.0.0.1 bouncer-tcp
add_target bouncer-tcp "$bouncer_port" "$bouncer_pid"
extra_pids+=("$bouncer_pid")
start_pgbouncer 100 "$socket_dir" bouncer-unix
add_target bouncer-unix "$bouncer_port" "$bouncer_pid"
if [ -n "$pgcat" ] && start_pgcat "$pgcat"; then add_target pgcat-tcp "$pgcat_port" "$pgcat_pid"; fi
sleep 1

for mode in $modes; do
  for round in $(seq 0 $((rounds - 1))); do
    for i in $(round_order "$round" "${#names[@]}"); do
      if [ "$mode" = prepared ] && [[ "${names[$i]}" == bouncer-* ]]; then
        echo fail >> "$work/$mode.${names[$i]}"
        continue
      fi
      pgbench_tps "$work/$mode.${names[$i]}" -n -M "$mode" -c 16 -j 2 -T "$secs" -h 127.0.0.1 -p "${ports[$i]}" -U postgres postgres
    done
  done
done

echo "the hop's transport: pgbench TPC-B-like -c 16 -j 2 over TCP to each pooler, ${secs}s per run, $rounds interleaved rounds, median tps; scale 10, $(nproc) cores"
header=(mode "${names[@]}" proxy-unix/proxy-tcp bouncer-unix/bouncer-tcp proxy-unix/bouncer-unix)
if [[ " ${names[*]} " == *" pgcat-tcp "* ]]; then header+=(proxy-tcp/pgcat-tcp proxy-unix/pgcat-tcp); fi
printf "%-9s" "${header[0]}"; printf " %13s" "${header[@]:1}"; echo
declare -A median
for mode in $modes; do
  for n in "${names[@]}"; do median[$n]=$(median_of "$work/$mode.$n"); done
  row=("$mode")
  for n in "${names[@]}"; do row+=("${median[$n]}"); done
  row+=("$(ratio "${median[proxy-unix]}" "${median[proxy-tcp]}")")
  row+=("$(ratio "${median[bouncer-unix]}" "${median[bouncer-tcp]}")")
  row+=("$(ratio "${median[proxy-unix]}" "${median[bouncer-unix]}")")
  if [ -n "${median[pgcat-tcp]:-}" ]; then
    row+=("$(ratio "${median[proxy-tcp]}" "${median[pgcat-tcp]}")")
    row+=("$(ratio "${median[proxy-unix]}" "${median[pgcat-tcp]}")")
  fi
  printf "%-9s" "${row[0]}"; printf " %13s" "${row[@]:1}"; echo
done
for mode in $modes; do
  paired_ratios "$work/$mode.proxy-unix" "$work/$mode.proxy-tcp" "  $mode proxy-unix/proxy-tcp"
  paired_ratios "$work/$mode.bouncer-unix" "$work/$mode.bouncer-tcp" "  $mode bouncer-unix/bouncer-tcp"
  if [ -f "$work/$mode.pgcat-tcp" ]; then
    paired_ratios "$work/$mode.proxy-unix" "$work/$mode.pgcat-tcp" "  $mode proxy-unix/pgcat-tcp"
  fi
done
