#!/usr/bin/env bash
# What COPY FROM STDIN through the proxy and a transaction over two servers
# cost, each against the same work on Postgres directly, in one run on a dev
# cluster of 3 servers (16 partitions) with the proxy in front.
#
# 1. COPY throughput. One file of ROWS rows (~107 bytes a row in CSV: id,
#    user_id, amount, created_at, 64-character payload; 100,003 user ids, so
#    every partition gets rows), loaded with psql `\copy ... from FILE`:
#      direct   straight into a plain table on one server (bench_copy_plain,
#               not in the map: the baseline of the issue)
#      proxy    through the proxy into bench_copy, sharded by hash of user_id:
#               the proxy splits the rows to the 3 owners (one transaction,
#               two-phase commit)
#      split x3  each server's share of the same rows (exported once, beforehand)
#               straight into its bench_copy, the 3 psql at once: what a
#               client that split the rows itself would get, i.e. the proxy's
#               ideal
#    Both tables have PRIMARY KEY (user_id, id). Every load starts on empty
#    tables (TRUNCATE on each server directly: the proxy does not fan DDL
#    out). After every proxy load the rows are counted on the servers
#    directly and must add up to ROWS (a Postgres server refuses a row whose
#    partition has no leaf there, so a row sent to the wrong owner fails the
#    COPY loudly). FORMATS: csv, and binary (the same rows as a binary COPY
#    file). MB/s = file size (MB = 2^20 bytes) / wall time of the psql run.
#    The proxy side uses 3 Postgres backends at once where direct uses one:
#    on this 2-core machine a ratio above 1 is the servers' parallelism, not
#    the proxy being free; proxy/split x3 is the proxy's own cost.
#
# 2. Transaction cost. pgbench custom scripts, each transaction
#      BEGIN; UPDATE t SET v = v + 1 WHERE user_id = :a;
#             UPDATE t SET v = v + 1 WHERE user_id = :b; COMMIT;
#    over ACCOUNTS accounts (bench_acct, sharded like bench_copy), with (a, b)
#    one of 1,000 pairs of distinct keys picked at random per transaction:
#      direct       one-server pairs, on a plain copy of the table on one
#                   server, no proxy
#      proxy 1srv   through the proxy, a and b owned by the same server
#      proxy 2srv   through the proxy, a and b owned by different servers
#                   (every pair of servers): PREPARE TRANSACTION on both, the
#                   decision in etcd, COMMIT PREPARED on both
#    Owners are read on the servers (each lists the keys it holds), and the
#    pairs are written into the scripts as a binary tree of pgbench CASE
#    expressions on `\set i random(...)` (10 comparisons; pgbench cannot index
#    an array). Every run is checked: the sum of v over the servers must grow by
#    2 per transaction pgbench counted, and the proxy's
#    shardline_two_phase_commits must grow by one per transaction in the
#    2srv runs and not at all in the 1srv runs (column "check"). Modes of
#    MODES (default "simple extended"), -c 1 and -c 8 (-j 2), ROUNDS rounds
#    interleaved (direct, 1srv, 2srv), RUN_SECONDS (or SECONDS) per run.
#    A run that fails prints "refused" and pgbench's error below the table.
#
# Medians over the rounds; ratios within this run only (the machine is shared
# and noisy); nothing is asserted about times. The proxy's log is checked for
# warnings and errors, and the servers for prepared transactions left behind,
# at the end.
#
# Usage: [ROWS=1000000] [ROUNDS=3] [SECONDS=8] [MODES="simple extended"]
#        [FORMATS="csv binary"] [ACCOUNTS=10000] bench/copy_and_2pc.sh
#        (e.g. ROWS=100000 ROUNDS=1 SECONDS=2 for a quick run; takes ~8 min
#        with the defaults)
# bash counts SECONDS up from the value it imports: read it first thing.
imported_seconds=$SECONDS
set -euo pipefail
cd "$(dirname "$0")/.."
rows=${ROWS:-1000000}
rounds=${ROUNDS:-3}
secs=${RUN_SECONDS:-$imported_seconds}
[ "$secs" -gt 0 ] 2>/dev/null || secs=8
modes=${MODES:-"simple extended"}
formats=${FORMATS:-"csv binary"}
accounts=${ACCOUNTS:-10000}
pairs=1000
partitions=16
[[ "$rows" =~ ^[0-9]+$ && "$rows" -ge 1000 ]] || { echo "ROWS must be a number ≥ 1000 (got $rows)" >&2; exit 2; }
[[ "$rounds" =~ ^[0-9]+$ && "$rounds" -ge 1 ]] || { echo "ROUNDS must be a number ≥ 1 (got $rounds)" >&2; exit 2; }
[[ "$accounts" =~ ^[0-9]+$ && "$accounts" -ge 6000 ]] || { echo "ACCOUNTS must be a number ≥ 6000 (got $accounts)" >&2; exit 2; }
for format in $formats; do
  case "$format" in csv | binary) ;; *) echo "FORMATS: csv and/or binary (got $format)" >&2; exit 2 ;; esac
done
# On a machine where builds share the cores, SHARDLINE_CARGO_LOCK=FILE makes
# the release build of bench_cluster wait for the others (flock FILE).
if [ -n "${SHARDLINE_CARGO_LOCK:-}" ]; then cargo() { flock "$SHARDLINE_CARGO_LOCK" cargo "$@"; }; fi

. bench/lib.sh
started=$(date +%s)
bench_cluster shardline-copy2pc 3 "$partitions"

# Before cleanup: the proxy's warnings and errors, whether it still runs, and
# prepared transactions left on the servers (two-phase commits that did not
# finish).
report_leftovers() {
  echo
  if [ -s "$work/proxy.log" ]; then
    local count
    count=$(grep -ciE 'warn|error|panic' "$work/proxy.log" || true)
    echo "proxy log: $(wc -l < "$work/proxy.log") lines, $count with WARN/ERROR/panic; the first 20 of those:"
    grep -iE 'warn|error|panic' "$work/proxy.log" | head -20 | cut -c1-400 | sed 's/^/  /'
  else
    echo "proxy log: empty (no warnings or errors)"
  fi
  if [ -n "${proxy_pid:-}" ] && ! kill -0 "$proxy_pid" 2>/dev/null; then
    echo "the proxy is no longer running (see its log above)"
  fi
  local port left
  for port in "${shard_ports[@]:-}"; do
    [ -n "$port" ] || continue
    left=$(sql_at "$port" -c "SELECT count(*) FROM pg_prepared_xacts" 2>/dev/null || echo "?")
    [ "$left" = 0 ] || echo "server on port $port: $left prepared transactions left"
  done
}
trap 'report_leftovers; bench_cleanup' EXIT

port_of() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['servers'][int(sys.argv[2])]['port'])" "$1" "$2"; }
conninfo() { echo "host=127.0.0.1 port=$1 user=postgres dbname=postgres"; }
sql_at() { local port=$1; shift; psql -qAtX -v ON_ERROR_STOP=1 "$(conninfo "$port")" "$@"; }
shard_ports=()
for index in 0 1 2; do shard_ports+=("$(port_of "$work/dev.json" "$index")"); done
direct_port=${shard_ports[0]}

metrics_port=$(free_port)
SHARDLINE_METRICS_LISTEN="127.0.0.1:$metrics_port" start_proxy
for _ in $(seq 100); do sql_at "$proxy_port" -c "SELECT 1" >/dev/null 2>&1 && break; sleep 0.1; done
two_phase_commits() {
  curl -sf "http://127.0.0.1:$metrics_port/metrics" | awk '/^shardline_two_phase_commits(_total)? / {print $2; exit}'
}
[ -n "$(two_phase_commits)" ] || { echo "no shardline_two_phase_commits on the proxy's metrics endpoint" >&2; exit 1; }

now_ns() { date +%s%N; }
ratio() { # a b -> a/b, or n/a when either is not a number
  python3 -c "
import sys
try: print('%.2f' % (float(sys.argv[1]) / float(sys.argv[2])))
except (ValueError, ZeroDivisionError): print('n/a')" "$1" "$2"
}
median() { sort -g | awk '{a[NR]=$1} END {if (NR==0) print "fail"; else print a[int((NR+1)/2)]}'; }
median_of() { { grep -vE 'fail|refused' "$1" || true; } | median; }

# ---------------------------------------------------------------- COPY
echo "== COPY: $rows rows, 3 servers ($partitions partitions) through the proxy, 1 server direct"
copy_columns="id bigint NOT NULL, user_id bigint NOT NULL, amount bigint NOT NULL, created_at timestamptz NOT NULL, payload text NOT NULL, PRIMARY KEY (user_id, id)"
"$bin/shardctl" table add bench_copy --key user_id --method hash --key-type bigint >/dev/null
"$bin/shardctl" table create bench_copy --columns "$copy_columns" >/dev/null
sql_at "$direct_port" -c "CREATE TABLE bench_copy_plain ($copy_columns)"
generated="SELECT g, 1 + (g * 7919) % 100003, (g * 31) % 100000, timestamptz '2024-01-01 00:00:00+00' + g * interval '1 second', md5(g::text) || md5((g + 1)::text) FROM generate_series(1::bigint, $rows) g"
declare -A copy_options=([csv]="csv" [binary]="with (format binary)")
declare -A file_mb file_bytes
for format in $formats; do
  sql_at "$direct_port" -c "\\copy ($generated) to '$work/rows.$format' ${copy_options[$format]}"
  file_bytes[$format]=$(stat -c %s "$work/rows.$format")
  file_mb[$format]=$(awk -v b="${file_bytes[$format]}" 'BEGIN {printf "%.1f", b / 1048576}')
done
truncate_all() {
  sql_at "$direct_port" -c "TRUNCATE bench_copy_plain"
  for port in "${shard_ports[@]}"; do sql_at "$port" -c "TRUNCATE bench_copy"; done
}
server_counts() { # table -> "n1 n2 n3"
  local port out=()
  for port in "${shard_ports[@]}"; do out+=("$(sql_at "$port" -c "SELECT count(*) FROM $1")"); done
  echo "${out[*]}"
}
copy_timed() { # port table file options -> seconds, or "fail" (psql's error in $work/error)
  local t0 t1
  t0=$(now_ns)
  if sql_at "$1" -c "\\copy $2 from '$3' $4" 2> "$work/error"; then
    t1=$(now_ns)
    awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", (b - a) / 1e9}'
  else
    echo fail
  fi
}
mbps() { # format seconds -> MB/s
  [ "$2" = fail ] && { echo fail; return; }
  awk -v b="${file_bytes[$1]}" -v s="$2" 'BEGIN {printf "%.1f\n", b / 1048576 / s}'
}
notes=()
# Once, untimed: the proxy's load, checked, and each server's share of it
# exported for the split x3 baseline.
for format in $formats; do
  truncate_all
  seconds=$(copy_timed "$proxy_port" bench_copy "$work/rows.$format" "${copy_options[$format]}")
  [ "$seconds" != fail ] || { echo "COPY ($format) through the proxy failed: $(cat "$work/error")" >&2; exit 1; }
  read -r -a counts <<<"$(server_counts bench_copy)"
  total=$((counts[0] + counts[1] + counts[2]))
  echo "$format file ${file_mb[$format]} MB; loaded through the proxy once: ${counts[*]} rows on the 3 servers, $total in all"
  [ "$total" -eq "$rows" ] || { echo "the servers hold $total rows, not $rows" >&2; exit 1; }
  for index in 0 1 2; do
    sql_at "${shard_ports[$index]}" -c "\\copy (SELECT * FROM bench_copy) to '$work/share$index.$format' ${copy_options[$format]}"
  done
done
split_timed() { # format -> seconds, or "fail"
  local t0 t1 index pids=() failed=0
  t0=$(now_ns)
  for index in 0 1 2; do
    sql_at "${shard_ports[$index]}" -c "\\copy bench_copy from '$work/share$index.$1' ${copy_options[$1]}" 2> "$work/error$index" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  t1=$(now_ns)
  if [ "$failed" = 0 ]; then awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", (b - a) / 1e9}'; else cat "$work"/error? > "$work/error"; echo fail; fi
}
for format in $formats; do : > "$work/copy_direct.$format"; : > "$work/copy_proxy.$format"; : > "$work/copy_split.$format"; done
for round in $(seq "$rounds"); do
  line="round $round:"
  for format in $formats; do
    truncate_all
    direct=$(copy_timed "$direct_port" bench_copy_plain "$work/rows.$format" "${copy_options[$format]}")
    [ "$direct" = fail ] && notes+=("COPY $format direct: $(head -1 "$work/error")")
    [ "$direct" = fail ] || [ "$(sql_at "$direct_port" -c "SELECT count(*) FROM bench_copy_plain")" -eq "$rows" ] \
      || { echo "direct COPY ($format) did not load $rows rows" >&2; exit 1; }
    truncate_all
    proxy=$(copy_timed "$proxy_port" bench_copy "$work/rows.$format" "${copy_options[$format]}")
    if [ "$proxy" = fail ]; then
      total="-"
      notes+=("COPY $format through the proxy: $(head -1 "$work/error")")
    else
      read -r -a counts <<<"$(server_counts bench_copy)"
      total=$((counts[0] + counts[1] + counts[2]))
      [ "$total" -eq "$rows" ] || { echo "after the proxy's COPY ($format) the servers hold $total rows (${counts[*]}), not $rows" >&2; exit 1; }
    fi
    truncate_all
    split=$(split_timed "$format")
    [ "$split" = fail ] && notes+=("COPY $format split x3: $(head -1 "$work/error")")
    mbps "$format" "$direct" >> "$work/copy_direct.$format"
    mbps "$format" "$proxy" >> "$work/copy_proxy.$format"
    mbps "$format" "$split" >> "$work/copy_split.$format"
    line="$line $format direct $(mbps "$format" "$direct"), proxy $(mbps "$format" "$proxy") (${total} rows counted), split x3 $(mbps "$format" "$split") MB/s;"
  done
  echo "$line"
done
truncate_all

# ---------------------------------------------------------------- transactions
echo
echo "== transactions: $accounts accounts, $pairs pairs of keys per script"
"$bin/shardctl" table add bench_acct --key user_id --method hash --key-type bigint >/dev/null
"$bin/shardctl" table create bench_acct --columns "user_id bigint PRIMARY KEY, v bigint NOT NULL" >/dev/null
sql_at "$direct_port" -c "CREATE TABLE bench_acct_plain (user_id bigint PRIMARY KEY, v bigint NOT NULL)"
seq 1 "$accounts" | sed 's/$/,0/' > "$work/accounts.csv"
sql_at "$proxy_port" -c "\\copy bench_acct from '$work/accounts.csv' csv"
sql_at "$direct_port" -c "\\copy bench_acct_plain from '$work/accounts.csv' csv"
for index in 0 1 2; do
  sql_at "${shard_ports[$index]}" -c "VACUUM ANALYZE bench_acct"
  sql_at "${shard_ports[$index]}" -c "SELECT user_id FROM bench_acct ORDER BY user_id" > "$work/keys.$index"
done
sql_at "$direct_port" -c "VACUUM ANALYZE bench_acct_plain"
echo "keys per server: $(wc -l < "$work/keys.0") $(wc -l < "$work/keys.1") $(wc -l < "$work/keys.2")"
# one.T.sql / two.T.sql for T = bench_acct, bench_acct_plain.
python3 - "$work" "$pairs" <<'PY'
import sys
work, n = sys.argv[1], int(sys.argv[2])
keys = [open(f"{work}/keys.{i}").read().split() for i in range(3)]
need = 4 * n // 3 + 2
if min(len(k) for k in keys) < need:
    sys.exit(f"a server holds fewer than {need} keys: raise ACCOUNTS")
taken = [iter(k) for k in keys]
# One-server pairs: two distinct keys of the same server, servers in turn.
one = [(next(taken[i % 3]), next(taken[i % 3])) for i in range(n)]
# Two-server pairs: server s and server s+1, so every pair of servers.
two = [(next(taken[i % 3]), next(taken[(i + 1) % 3])) for i in range(n)]
def tree(values, lo, hi):
    if hi - lo == 1:
        return values[lo]
    mid = (lo + hi) // 2
    return f"CASE WHEN :i < {mid} THEN {tree(values, lo, mid)} ELSE {tree(values, mid, hi)} END"
for name, chosen in (("one", one), ("two", two)):
    for table in ("bench_acct", "bench_acct_plain"):
        with open(f"{work}/{name}.{table}.sql", "w") as f:
            f.write(f"\\set i random(0, {n - 1})\n")
            f.write(f"\\set a {tree([a for a, _ in chosen], 0, n)}\n")
            f.write(f"\\set b {tree([b for _, b in chosen], 0, n)}\n")
            f.write(f"BEGIN;\nUPDATE {table} SET v = v + 1 WHERE user_id = :a;\n"
                    f"UPDATE {table} SET v = v + 1 WHERE user_id = :b;\nCOMMIT;\n")
PY

sum_v() { # target -> sum of v (direct: the plain table; proxy: bench_acct on every server)
  if [ "$1" = direct ]; then
    sql_at "$direct_port" -c "SELECT coalesce(sum(v), 0) FROM bench_acct_plain"
  else
    local port total=0
    for port in "${shard_ports[@]}"; do total=$((total + $(sql_at "$port" -c "SELECT coalesce(sum(v), 0) FROM bench_acct"))); done
    echo "$total"
  fi
}
run_tx() { # target(direct|one|two) mode clients -> "tps check", or "refused -" (error in $work/error)
  local port script out v0 c0 v1 c1 done_tx check=ok
  case "$1" in
    direct) port=$direct_port; script="$work/one.bench_acct_plain.sql" ;;
    one) port=$proxy_port; script="$work/one.bench_acct.sql" ;;
    two) port=$proxy_port; script="$work/two.bench_acct.sql" ;;
  esac
  v0=$(sum_v "$1"); c0=$(two_phase_commits)
  if out=$(pgbench -n -M "$2" -f "$script" -c "$3" -j 2 -T "$secs" -h 127.0.0.1 -p "$port" -U postgres postgres 2>&1) \
     && grep -q '^tps = ' <<<"$out"; then
    v1=$(sum_v "$1"); c1=$(two_phase_commits)
    done_tx=$(awk '/^number of transactions actually processed: / {print $6; exit}' <<<"$out")
    done_tx=${done_tx%%/*}
    [ $((v1 - v0)) -eq $((2 * done_tx)) ] || check="v+$((v1 - v0))≠2×$done_tx"
    case "$1" in
      two) [ $((c1 - c0)) -eq "$done_tx" ] || check="2pc $((c1 - c0))≠$done_tx" ;;
      *) [ $((c1 - c0)) -eq 0 ] || check="2pc $((c1 - c0))≠0" ;;
    esac
    echo "$(awk '/^tps = / {printf "%.1f", $3; exit}' <<<"$out") $check"
  else
    { grep -m1 -iE 'error|fatal|abort' <<<"$out" || tail -1 <<<"$out"; } > "$work/error"
    echo "refused -"
  fi
}

# What the commit point adds besides PREPARE and COMMIT PREPARED: the
# decision's write to etcd and its deletion, both awaited before the client
# gets COMMIT. The dev cluster's etcd syncs its log on every write (its
# Postgres servers run with fsync = off), so these two dominate.
etcd_ms=$(python3 - "$etcd" <<'PY'
import base64, http.client, json, statistics, sys, time, urllib.parse
endpoint = urllib.parse.urlparse(sys.argv[1])
connection = http.client.HTTPConnection(endpoint.hostname, endpoint.port, timeout=10)
def call(path, body):
    connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    response.read()
    assert response.status == 200, response.status
key = base64.b64encode(b"/shardline-bench/etcd-probe").decode()
times = []
for _ in range(100):
    started = time.perf_counter()
    call("/v3/kv/put", {"key": key, "value": base64.b64encode(b"commit").decode()})
    call("/v3/kv/deleterange", {"key": key})
    times.append((time.perf_counter() - started) * 1000)
print("%.2f" % statistics.median(times))
PY
) || etcd_ms=fail
echo "etcd put + delete of one key (what each two-server commit adds to its PREPAREs and COMMIT PREPAREDs): median $etcd_ms ms"
echo "pgbench -j 2 -T $secs per run, $rounds interleaved rounds, median tps; 1srv/direct and 2srv/1srv are tps ratios (< 1: slower)"
tx_format="%-9s %3s %10s %11s %11s %12s %10s  %s\n"
tx_rows=()
declare -A labels=([direct]=direct [one]="proxy 1srv" [two]="proxy 2srv")
for mode in $modes; do
  for clients in 1 8; do
    for target in direct one two; do : > "$work/tps.$target"; done
    checks=""
    for _ in $(seq "$rounds"); do
      for target in direct one two; do
        read -r tps check <<<"$(run_tx "$target" "$mode" "$clients")"
        echo "$tps" >> "$work/tps.$target"
        if [ "$tps" = refused ]; then
          notes+=("${labels[$target]}, -M $mode -c $clients: $(cut -c1-300 "$work/error")")
        elif [ "$check" != ok ]; then
          checks="$checks $target:$check"
        fi
      done
    done
    d=$(median_of "$work/tps.direct"); o=$(median_of "$work/tps.one"); t=$(median_of "$work/tps.two")
    grep -q refused "$work/tps.one" && o="refused($(grep -c refused "$work/tps.one")/$rounds)${o/fail/}"
    grep -q refused "$work/tps.two" && t="refused($(grep -c refused "$work/tps.two")/$rounds)${t/fail/}"
    # shellcheck disable=SC2059
    row=$(printf "$tx_format" "$mode" "$clients" "$d" "$o" "$t" "$(ratio "$o" "$d")" "$(ratio "$t" "$o")" "${checks:-ok}")
    echo "$row"
    tx_rows+=("$row")
  done
done

# ---------------------------------------------------------------- summary
echo
echo "== summary ($(( $(date +%s) - started )) s)"
echo "COPY of $rows rows, MB/s (median of $rounds rounds); proxy/direct > 1: faster through the proxy"
copy_format="%-7s %8s %10s %10s %12s %14s %14s\n"
# shellcheck disable=SC2059
printf "$copy_format" format "file MB" direct proxy "split x3" "proxy/direct" "proxy/split x3"
for format in $formats; do
  d=$(median_of "$work/copy_direct.$format"); p=$(median_of "$work/copy_proxy.$format"); s=$(median_of "$work/copy_split.$format")
  grep -q fail "$work/copy_proxy.$format" && p="refused"
  # shellcheck disable=SC2059
  printf "$copy_format" "$format" "${file_mb[$format]}" "$d" "$p" "$s" "$(ratio "$p" "$d")" "$(ratio "$p" "$s")"
done
echo
echo "Transactions of 2 UPDATEs, tps (median of $rounds rounds, ${secs} s each); etcd put + delete: $etcd_ms ms"
# shellcheck disable=SC2059
printf "$tx_format" mode -c direct "proxy 1srv" "proxy 2srv" "1srv/direct" "2srv/1srv" check
for row in "${tx_rows[@]}"; do echo "$row"; done
if [ "${#notes[@]}" -gt 0 ]; then
  echo
  echo "refused or failed:"
  for note in "${notes[@]}"; do echo "  $note"; done
fi
