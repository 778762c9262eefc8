#!/usr/bin/env bash
# An application-like workload, pgbench -c 16 -j 2 against one Postgres
# directly, through pgbouncer (transaction pooling), through the shardline
# proxy and through PgCat (transaction pooling, when a build is found), in one
# run: interleaved rounds, each round running every target once per mode,
# starting one target later than the round before (`round_order` in lib.sh).
# Prints one table per workload: per mode the median tps of each target and
# the ratios proxy/direct, proxy/pgbouncer, proxy/pgcat; under it, each
# round's own ratio of the proxy to every other pooler (the two ran seconds
# apart), with their median and range.
# Machines are shared and noisy: compare ratios within one run only.
#
# Workloads (pgbench_accounts sharded by aid over 16 partitions of a
# one-server dev cluster, the other pgbench tables homed on pg1, scale
# SCALE):
#   tpcb    pgbench's builtin TPC-B-like transaction (BEGIN; UPDATE accounts;
#           SELECT accounts; UPDATE tellers; UPDATE branches; INSERT history;
#           END)
#   mix     a read/write mix of transactions of 2 to 5 statements, each
#           touching one account (so one server on any cluster): 50% read an
#           account and its branch (2), 30% read-modify-write an account and
#           log it (3), 20% a purchase: lock the account, debit it, credit a
#           teller, log it, read the new balance (5)
#   select  pgbench -S (one SELECT by aid per transaction)
# Modes: simple, extended, prepared (pgbench -M). A target that fails a mode
# (pgbouncer 1.18 refuses -M prepared in transaction pooling) shows `fail`
# and `n/a` ratios, with its first error below the table.
#
# PgCat: PGCAT=/path/to/pgcat, else the binary bench/pgcat.sh caches; without
# either its columns are left out. BASELINE_PROXY=path runs another
# shardline-proxy binary (say, built from an earlier commit) in the same
# rounds, adding proxy/baseline. PROXY_THREADS=N passes --threads N to the
# proxy (and the baseline). CLIENTS (default 16) sets pgbench -c.
# SCALE sets pgbench -i -s; by default the number of clients, and 10 at
# least. pgbench's documentation asks for a scale at least the number of
# clients for TPC-B, "else you'll mostly be measuring update contention":
# each transaction updates one of SCALE branch rows, and 16 clients on 10
# rows queue on each other's row locks (docs/PERFORMANCE.md, "Scale"). Runs
# before 2026-12-05 (run R) used scale 10; SCALE=10 repeats them.
#
# Usage: [PGCAT=path] [BASELINE_PROXY=path [BASELINE_CONFIG=file]] [PROXY_THREADS=N] [CLIENTS=16] [SCALE=16] \
#          bench/workload.sh [SECONDS_PER_RUN] [ROUNDS] [MODES] [WORKLOADS]
#   defaults: 10 3 "simple extended prepared" "tpcb mix select"
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
rounds=${2:-3}
modes=${3:-"simple extended prepared"}
workloads=${4:-"tpcb mix select"}
clients=${CLIENTS:-16}
case "$clients" in ''|*[!0-9]*|0) echo "CLIENTS=$clients: a positive whole number (pgbench -c)" >&2; exit 2 ;; esac
scale=${SCALE:-$((clients > 10 ? clients : 10))}
case "$scale" in ''|*[!0-9]*|0) echo "SCALE=$scale: a positive whole number (pgbench -i -s)" >&2; exit 2 ;; esac
for w in $workloads; do
  case "$w" in tpcb|mix|select) ;; *) echo "unknown workload $w: tpcb, mix or select" >&2; exit 2 ;; esac
done

. bench/lib.sh
check_modes "$modes"
ensure_pgbouncer
pgcat_bin=$(pgcat_binary)
bench_cluster shardline-workload
bench_pgbench_schema "$scale"

# The proxy reads its --threads from SHARDLINE_PROXY_THREADS (so does the baseline).
if [ -n "${PROXY_THREADS:-}" ]; then export SHARDLINE_PROXY_THREADS="$PROXY_THREADS"; fi
# shellcheck disable=SC2119 # no config file: the defaults
start_proxy
start_pgbouncer 1000
names=(direct pgbouncer proxy)
ports=("$pg_port" "$bouncer_port" "$proxy_port")
if [ -n "$pgcat_bin" ]; then
  if start_pgcat "$pgcat_bin"; then
    names+=(pgcat); ports+=("$pgcat_port")
  else
    echo "PgCat did not start: no PgCat columns" >&2
  fi
fi
start_baseline
if [ -n "$baseline_pid" ]; then
  names+=(baseline); ports+=("$baseline_port")
fi
trap 'if [ -n "$baseline_pid" ]; then kill "$baseline_pid" 2>/dev/null; fi; bench_cleanup' EXIT

# The mix: one account per transaction, so its statements stay on one server.
cat > "$work/mix_read.sql" <<'SQL'
\set aid random(1, 100000 * :scale)
\set bid random(1, :scale)
BEGIN;
SELECT aid, bid, abalance FROM pgbench_accounts WHERE aid = :aid;
SELECT bid, bbalance FROM pgbench_branches WHERE bid = :bid;
END;
SQL
cat > "$work/mix_rmw.sql" <<'SQL'
\set aid random(1, 100000 * :scale)
\set tid random(1, 10 * :scale)
\set bid random(1, :scale)
\set delta random(-5000, 5000)
BEGIN;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid FOR UPDATE;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
END;
SQL
cat > "$work/mix_purchase.sql" <<'SQL'
\set aid random(1, 100000 * :scale)
\set tid random(1, 10 * :scale)
\set bid random(1, :scale)
\set delta random(1, 5000)
\set debit -:delta
BEGIN;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid FOR UPDATE;
UPDATE pgbench_accounts SET abalance = abalance + :debit WHERE aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tid = :tid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (:tid, :bid, :aid, :debit, CURRENT_TIMESTAMP);
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
END;
SQL

flags() { # workload -> pgbench flags
  case "$1" in
    tpcb) echo "" ;;
    select) echo "-S" ;;
    mix) echo "-s $scale -f $work/mix_read.sql@50 -f $work/mix_rmw.sql@30 -f $work/mix_purchase.sql@20" ;;
  esac
}
run() { # workload target port mode -> appends tps or "fail" to $work/<workload>.<mode>.<target>
  # shellcheck disable=SC2046
  PGPASSWORD=postgres pgbench_tps "$work/$1.$4.$2" -n $(flags "$1") -M "$4" -c "$clients" -j 2 -T "$secs" \
    -h 127.0.0.1 -p "$3" -U postgres postgres
}

echo "pgbench -c $clients -j 2, ${secs}s per run, $rounds interleaved rounds, median tps; scale $scale, $(nproc) cores" \
  "(proxy threads: ${PROXY_THREADS:-default}${pgcat_bin:+, PgCat worker threads: ${PGCAT_THREADS:-$(nproc)}})"
for w in $workloads; do
  for round in $(seq 0 $((rounds - 1))); do
    for mode in $modes; do
      for i in $(round_order "$round" "${#names[@]}"); do run "$w" "${names[$i]}" "${ports[$i]}" "$mode"; done
    done
  done
  echo
  case "$w" in
    tpcb) echo "tpcb: pgbench builtin TPC-B-like (5 statements in BEGIN..END)" ;;
    mix) echo "mix: 50% read (2 statements), 30% read-modify-write (3), 20% purchase (5), each in BEGIN..END" ;;
    select) echo "select: pgbench -S" ;;
  esac
  cols=(mode "${names[@]}")
  for n in "${names[@]}"; do [ "$n" = proxy ] || cols+=("proxy/$n"); done
  fmt="%-9s"; for _ in "${cols[@]:1}"; do fmt="$fmt %15s"; done
  # shellcheck disable=SC2059
  printf "$fmt\n" "${cols[@]}"
  for mode in $modes; do
    declare -A med=()
    for n in "${names[@]}"; do med[$n]=$(median_of "$work/$w.$mode.$n"); done
    row=("$mode")
    for n in "${names[@]}"; do row+=("${med[$n]}"); done
    for n in "${names[@]}"; do [ "$n" = proxy ] || row+=("$(ratio "${med[proxy]}" "${med[$n]}")"); done
    # shellcheck disable=SC2059
    printf "$fmt\n" "${row[@]}"
    unset med
  done
  # Round by round (each pair ran within seconds of each other): how far
  # the ratio of medians above is from what single rounds say.
  for mode in $modes; do
    for n in "${names[@]}"; do
      case "$n" in direct|proxy) continue ;; esac
      paired_ratios "$work/$w.$mode.proxy" "$work/$w.$mode.$n" "  $mode proxy/$n"
    done
  done
  for mode in $modes; do
    for n in "${names[@]}"; do
      f="$work/$w.$mode.$n"
      fails=$(grep -c fail "$f" || true)
      if [ "$fails" -gt 0 ]; then echo "  $n $mode: $fails/$rounds runs failed: $(tr '\n' ' ' < "$f.err")"; fi
    done
  done
done
# The work dir goes with the cluster: keep the proxy's log when it failed a run.
if grep -qs fail "$work"/*.proxy; then
  kept="/tmp/shardline-workload-proxy.$(date +%s).log"
  cp "$work/proxy.log" "$kept"
  echo "  the proxy failed a run: its log is kept in $kept"
fi
