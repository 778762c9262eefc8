#!/usr/bin/env bash
# What a scatter-gather read costs: the same queries through the proxy over
# three shard servers, and directly on one Postgres holding all the rows
# (no proxy). Both sides get the same table of ROWS rows:
#
#   bench_rows(id bigint PRIMARY KEY, grp int, val bigint, payload text)
#   sharded by hash of id over 16 partitions, grp = id % 1000 (1,000 groups)
#
# Queries, each run with pgbench (-c 1, -T SECONDS) in every protocol mode of
# MODES (default "simple extended"):
#   count        SELECT count(*)                                   (partial counts summed)
#   top100_key   ORDER BY id DESC LIMIT 100                        (index on each server, merge)
#   top100_val   ORDER BY val DESC, id DESC LIMIT 100              (a full sort on each server, merge)
#   group_1000   GROUP BY grp: count(*), sum(val), min/max(val)    (1,000 groups on every server, combined)
# Each query's result through the proxy is also compared with the single
# server's once (column "same": yes/NO). A query the proxy refuses prints
# "refused" and the reason below the table.
#
# Then the whole table streamed to a client (SELECT of every row and column):
# once with pgbench -t 1 (libpq reads as fast as it can: the time), once with
# a Python psycopg client reading row by row (slower than three servers send:
# the proxy must hold back instead of buffering). The proxy's peak resident
# memory (VmHWM in /proc/PID/status) is printed before and after both: it
# must stay bounded, independent of ROWS. (`psql` with FETCH_COUNT uses a
# cursor, which pins a transaction to one server; plain `psql` buffers the
# whole result in psql, not in the proxy — hence these two clients.)
#
# Shards are loaded directly (generate_series on each server, filtered by the
# map's hash partition function: Postgres itself refuses a row whose
# partition has no leaf there, so a wrong filter fails loudly); inserting
# 10M rows through the proxy would take far longer. Ratios are proxy/single
# per query: latency ratio > 1 means the scatter is slower. The two sides
# share the machine's cores: compare ratios within one run only. Nothing is
# asserted about times.
#
# Usage: [MODES="simple extended"] bench/scatter_vs_single.sh [ROWS] [SECONDS_PER_RUN]
#        (ROWS default 10000000; e.g. 200000 5 for a quick run)
set -euo pipefail
cd "$(dirname "$0")/.."
rows=${1:-10000000}
secs=${2:-10}
modes=${MODES:-"simple extended"}
partitions=16
[[ "$rows" =~ ^[0-9]+$ && "$rows" -ge 1000 ]] || { echo "ROWS must be a number ≥ 1000 (got $rows)" >&2; exit 2; }
# On a machine where builds share the cores, SHARDLINE_CARGO_LOCK=FILE makes
# the release build of bench_cluster wait for the others (flock FILE).
if [ -n "${SHARDLINE_CARGO_LOCK:-}" ]; then cargo() { flock "$SHARDLINE_CARGO_LOCK" cargo "$@"; }; fi

. bench/lib.sh
bench_cluster shardline-scatter 3 "$partitions"
"$bin/shardctl" dev up --dir "$work/single" --servers 1 --partitions 1 --json > "$work/single.json"
trap '"$bin/shardctl" dev down --dir "$work/single" >/dev/null 2>&1 || true; bench_cleanup' EXIT

port_of() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['servers'][int(sys.argv[2])]['port'])" "$1" "$2"; }
single_port=$(port_of "$work/single.json" 0)
conninfo() { echo "host=127.0.0.1 port=$1 user=postgres dbname=postgres"; }
sql_at() { local port=$1; shift; psql -qAtX -v ON_ERROR_STOP=1 "$(conninfo "$port")" "$@"; }

echo "== $rows rows: 3 shard servers ($partitions partitions) and 1 single server"
columns="id bigint PRIMARY KEY, grp int NOT NULL, val bigint NOT NULL, payload text NOT NULL"
"$bin/shardctl" table add bench_rows --key id --method hash --key-type bigint >/dev/null
"$bin/shardctl" table create bench_rows --columns "$columns" >/dev/null
sql_at "$single_port" -c "CREATE TABLE bench_rows ($columns)"

# Postgres's partition of a bigint key: hash_combine64(0, hashint8extended(key,
# HASH_PARTITION_SEED)) mod P, i.e. (hash + 0x49a0f4dd15e5a8e3) mod P; P is a
# power of two, so only the low bits of both terms matter (no bigint overflow).
seed=$((0x7A5B22367996DCFD))
offset=$((0x49a0f4dd15e5a8e3 & (partitions - 1)))
partition_of_g="((hashint8extended(g, $seed) & $((partitions - 1))) + $offset) % $partitions"
generated="SELECT g, (g % 1000)::int, (g * 7919) % 1000003, 'payload-' || g FROM generate_series(1::bigint, $rows) g"

"$bin/shardctl" map --json > "$work/map.json"
load_started=$(date +%s)
sql_at "$single_port" -c "INSERT INTO bench_rows $generated" &
loads=($!)
shard_ports=()
for index in 0 1 2; do
  port=$(port_of "$work/dev.json" "$index")
  shard_ports+=("$port")
  name=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['servers'][int(sys.argv[2])]['name'])" "$work/dev.json" "$index")
  owned=$(python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print(','.join(str(p) for p,a in enumerate(m['assignments']) if a['owner']==sys.argv[2]))" "$work/map.json" "$name")
  sql_at "$port" -c "INSERT INTO bench_rows $generated WHERE $partition_of_g IN ($owned)" &
  loads+=($!)
done
for pid in "${loads[@]}"; do wait "$pid"; done
for port in "$single_port" "${shard_ports[@]}"; do sql_at "$port" -c "VACUUM ANALYZE bench_rows" & done
wait
sharded=0
for port in "${shard_ports[@]}"; do sharded=$((sharded + $(sql_at "$port" -c "SELECT count(*) FROM bench_rows"))); done
table_bytes=$(sql_at "$single_port" -c "SELECT pg_table_size('bench_rows')")
echo "loaded in $(( $(date +%s) - load_started )) s: $sharded rows over the shards, $(sql_at "$single_port" -c "SELECT count(*) FROM bench_rows") on the single server, table $((table_bytes / 1048576)) MB"
[ "$sharded" -eq "$rows" ] || { echo "the shards hold $sharded rows, not $rows: the partition filter is wrong" >&2; exit 1; }

start_proxy
for _ in $(seq 100); do sql_at "$proxy_port" -c "SELECT 1" >/dev/null 2>&1 && break; sleep 0.1; done
hwm_kb() { awk '/^VmHWM/ {print $2}' "/proc/$proxy_pid/status"; }
rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$proxy_pid/status"; }
hwm_idle=$(hwm_kb)

# name | ordered (compare rows in order) | SQL
queries=(
  "count|yes|SELECT count(*) FROM bench_rows"
  "top100_key|yes|SELECT id, val FROM bench_rows ORDER BY id DESC LIMIT 100"
  "top100_val|yes|SELECT id, val FROM bench_rows ORDER BY val DESC, id DESC LIMIT 100"
  "group_1000|no|SELECT grp, count(*), sum(val), min(val), max(val) FROM bench_rows GROUP BY grp"
)

run() { # port mode file -> "tps latency_ms" or "fail fail" (pgbench's error in $work/error)
  local out
  if out=$(pgbench -n -M "$2" -f "$3" -c 1 -T "$secs" -h 127.0.0.1 -p "$1" -U postgres postgres 2>&1) \
     && grep -q '^tps = ' <<<"$out"; then
    echo "$(awk '/^tps = / {printf "%.1f", $3; exit}' <<<"$out") $(awk '/^latency average = / {print $4; exit}' <<<"$out")"
  else
    grep -m1 -iE 'error|fatal' <<<"$out" > "$work/error" || echo "$out" | tail -1 > "$work/error"
    echo "fail fail"
  fi
}
ratio() { # a b -> a/b, or n/a when either is not a number
  python3 -c "
import sys
try: print('%.2f' % (float(sys.argv[1]) / float(sys.argv[2])))
except (ValueError, ZeroDivisionError): print('n/a')" "$1" "$2"
}
same_result() { # ordered sql -> yes / NO / refused
  local proxy_out single_out
  proxy_out=$(sql_at "$proxy_port" -c "$2" 2>&1) || { echo refused; return; }
  single_out=$(sql_at "$single_port" -c "$2")
  if [ "$1" = no ]; then proxy_out=$(sort <<<"$proxy_out"); single_out=$(sort <<<"$single_out"); fi
  [ "$proxy_out" = "$single_out" ] && echo yes || echo NO
}

echo
echo "== queries: pgbench -c 1 -T $secs per run; latency in ms; proxy/single latency > 1 means the scatter is slower"
format="%-11s %-9s %11s %11s %11s %11s %14s %6s\n"
# shellcheck disable=SC2059
printf "$format" query mode "single tps" "proxy tps" "single ms" "proxy ms" "proxy/single" same
notes=()
for entry in "${queries[@]}"; do
  IFS='|' read -r name ordered sql <<<"$entry"
  echo "$sql;" > "$work/$name.sql"
  same=$(same_result "$ordered" "$sql")
  for mode in $modes; do
    read -r single_tps single_ms <<<"$(run "$single_port" "$mode" "$work/$name.sql")"
    read -r proxy_tps proxy_ms <<<"$(run "$proxy_port" "$mode" "$work/$name.sql")"
    if [ "$proxy_tps" = fail ]; then
      notes+=("$name ($mode) through the proxy: $(cat "$work/error")")
      proxy_tps=refused; proxy_ms=refused
    fi
    # shellcheck disable=SC2059
    printf "$format" "$name" "$mode" "$single_tps" "$proxy_tps" "$single_ms" "$proxy_ms" "$(ratio "$proxy_ms" "$single_ms")" "$same"
  done
done
for note in "${notes[@]}"; do echo "  $note"; done

echo
echo "== streaming all $rows rows (table $((table_bytes / 1048576)) MB) to one client"
stream_sql="SELECT id, grp, val, payload FROM bench_rows"
echo "$stream_sql;" > "$work/stream.sql"
cat > "$work/stream.py" <<'PY'
# Reads every row one at a time (libpq single-row mode), as an application
# iterating over a big result would; prints rows and seconds.
import sys, time
import psycopg
with psycopg.connect(sys.argv[1], autocommit=True) as conn:
    started, count = time.monotonic(), 0
    with conn.cursor() as cursor:
        for _ in cursor.stream(sys.argv[2]):
            count += 1
    print(count, "%.2f" % (time.monotonic() - started))
PY
stream_pgbench() { # port -> latency ms or "fail"
  local out
  if out=$(pgbench -n -M extended -f "$work/stream.sql" -c 1 -t 1 -h 127.0.0.1 -p "$1" -U postgres postgres 2>&1) \
     && grep -q '^latency average' <<<"$out"; then
    awk '/^latency average = / {printf "%.0f", $4; exit}' <<<"$out"
  else
    grep -m1 -iE 'error|fatal' <<<"$out" > "$work/error" || echo "$out" | tail -1 > "$work/error"
    echo fail
  fi
}
stream_python() { # port -> "rows seconds" or "fail fail"
  python3 "$work/stream.py" "$(conninfo "$1")" "$stream_sql" 2> "$work/error" || echo "fail fail"
}
# The proxy's user + system CPU time in clock ticks (fields 14 and 15 of
# /proc/PID/stat; the command name before them holds no spaces here).
cpu_ticks() { awk '{print $14 + $15}' "/proc/$proxy_pid/stat"; }
cpu_seconds() { python3 -c "import os,sys; print('%.2f' % ((int(sys.argv[2]) - int(sys.argv[1])) / os.sysconf('SC_CLK_TCK')))" "$1" "$2"; }
hwm_start=$(hwm_kb)
single_ms=$(stream_pgbench "$single_port")
cpu_before=$(cpu_ticks)
proxy_ms=$(stream_pgbench "$proxy_port")
proxy_cpu_fast=$(cpu_seconds "$cpu_before" "$(cpu_ticks)")
[ "$proxy_ms" = fail ] && echo "  pgbench through the proxy: $(cat "$work/error")"
hwm_fast=$(hwm_kb)
read -r single_rows single_s <<<"$(stream_python "$single_port")"
cpu_before=$(cpu_ticks)
read -r proxy_rows proxy_s <<<"$(stream_python "$proxy_port")"
proxy_cpu_slow=$(cpu_seconds "$cpu_before" "$(cpu_ticks)")
[ "$proxy_rows" = fail ] && echo "  psycopg through the proxy: $(grep -m1 -E '^psycopg|Error' "$work/error" || tail -1 "$work/error")"
hwm_slow=$(hwm_kb)
format="%-32s %12s %12s %14s\n"
# shellcheck disable=SC2059
printf "$format" client single proxy proxy/single
# shellcheck disable=SC2059
printf "$format" "pgbench -t 1 (ms)" "$single_ms" "$proxy_ms" "$(ratio "$proxy_ms" "$single_ms")"
# shellcheck disable=SC2059
printf "$format" "psycopg row by row (s)" "$single_s" "$proxy_s" "$(ratio "$proxy_s" "$single_s")"
# shellcheck disable=SC2059
printf "$format" "psycopg rows received" "$single_rows" "$proxy_rows" ""
echo "proxy CPU time (user + system): ${proxy_cpu_fast} s during the pgbench stream, ${proxy_cpu_slow} s during the row-by-row stream"
echo "proxy peak RSS (VmHWM): $((hwm_idle / 1024)) MB when started, $((hwm_start / 1024)) MB before streaming, $((hwm_fast / 1024)) MB after the pgbench stream," \
  "$((hwm_slow / 1024)) MB after the row-by-row stream (now $(( $(rss_kb) / 1024 )) MB resident);" \
  "growth $(( (hwm_slow - hwm_start) / 1024 )) MB for a $((table_bytes / 1048576)) MB table"
