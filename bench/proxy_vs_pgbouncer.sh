#!/usr/bin/env bash
# pgbench -S -c 16 -j 2 against one Postgres directly, through pgbouncer
# (transaction pooling) and through the shardline proxy, interleaved in one
# run, for the simple, extended and prepared protocol modes. Prints the median
# tps of each and the ratios proxy/direct and proxy/pgbouncer. A second proxy
# with kept statements turned off (`prepare_unnamed_after` and
# `prepare_simple_after` = 0) shows what they bring. Machines are shared and
# noisy: compare ratios within one run only.
#
# Usage: bench/proxy_vs_pgbouncer.sh [SECONDS_PER_RUN] [ROUNDS] [MODES]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
rounds=${2:-3}
modes=${3:-"simple extended prepared"}
clients=16

command -v pgbouncer >/dev/null 2>&1 || {
  echo "installing pgbouncer (Debian package) for the comparison" >&2
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq pgbouncer >/dev/null
}
. bench/lib.sh
bench_cluster shardline-bench
pgbench -i -q -s 10 -h 127.0.0.1 -p "$pg_port" -U postgres postgres >/dev/null 2>&1
"$bin/shardctl" table add pgbench_accounts --key aid --method hash --key-type int >/dev/null
for t in branches tellers history; do "$bin/shardctl" table add "pgbench_$t" --home pg1 >/dev/null; done
start_proxy
start_pgbouncer 1000
# The same proxy without kept statements, for comparison.
unkept_port=$(free_port)
printf '[pool]\nprepare_unnamed_after = 0\nprepare_simple_after = 0\n' > "$work/unkept.toml"
SHARDLINE_LOG=warn "$bin/shardline-proxy" --config "$work/unkept.toml" --etcd "$etcd" \
  --listen "127.0.0.1:$unkept_port" --auth-method trust > "$work/unkept.log" 2>&1 &
unkept_pid=$!
trap 'kill $unkept_pid 2>/dev/null; bench_cleanup' EXIT

run() { # target port mode -> tps or "fail"
  local out
  if out=$(pgbench -n -S -M "$3" -c $clients -j 2 -T "$secs" -h 127.0.0.1 -p "$2" -U postgres postgres 2>&1); then
    echo "$out" | awk '/^tps = / {print $3}' | head -1
  else
    echo "fail"
  fi
}
median() { sort -g | awk '{a[NR]=$1} END {if (NR==0) print "fail"; else print a[int((NR+1)/2)]}'; }

printf "pgbench -S -c %d -j 2, %ss per run, %d interleaved rounds, median tps\n" $clients "$secs" "$rounds"
printf "%-9s %10s %10s %10s %13s %16s %14s %17s\n" mode direct pgbouncer proxy proxy/direct proxy/pgbouncer "proxy(unkept)" unkept/pgbouncer
for mode in $modes; do
  : > "$work/direct"; : > "$work/bouncer.tps"; : > "$work/proxy.tps"; : > "$work/unkept.tps"
  for _ in $(seq "$rounds"); do
    run direct "$pg_port" "$mode" >> "$work/direct"
    run pgbouncer "$bouncer_port" "$mode" >> "$work/bouncer.tps"
    run proxy "$proxy_port" "$mode" >> "$work/proxy.tps"
    run proxy "$unkept_port" "$mode" >> "$work/unkept.tps"
  done
  d=$({ grep -v fail "$work/direct" || true; } | median)
  b=$({ grep -v fail "$work/bouncer.tps" || true; } | median)
  p=$({ grep -v fail "$work/proxy.tps" || true; } | median)
  u=$({ grep -v fail "$work/unkept.tps" || true; } | median)
  ratio() { python3 -c "import sys; a,b=sys.argv[1],sys.argv[2]; print('n/a' if 'fail' in (a,b) else '%.2f' % (float(a)/float(b)))" "$1" "$2"; }
  printf "%-9s %10s %10s %10s %13s %16s %14s %17s\n" "$mode" "$d" "$b" "$p" "$(ratio "$p" "$d")" "$(ratio "$p" "$b")" "$u" "$(ratio "$u" "$b")"
done
