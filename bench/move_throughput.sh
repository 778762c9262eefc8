#!/usr/bin/env bash
# Move speed of one partition of at least SIZE_MB (default 1024) between two
# servers, against a plain `COPY leaf TO STDOUT | COPY copy FROM STDIN`
# between the same two servers in the same run (into a table of the same
# shape, primary key included, as the move's target leaf has). Prints MB/s of
# both and the ratio move/COPY, for the whole move (submit to done) and for
# its copy phase.
#
# Usage: bench/move_throughput.sh [SIZE_MB]
set -euo pipefail
cd "$(dirname "$0")/.."
size_mb=${1:-1024}
. bench/lib.sh
bench_cluster shardline-move 2 2
export SHARDLINE_ETCD="$etcd"
ports=$(python3 -c "import json,sys; print(' '.join(str(s['port']) for s in json.load(open(sys.argv[1]))['servers']))" "$work/dev.json")
src_port=${ports%% *}; dst_port=${ports##* }
src="host=127.0.0.1 port=$src_port user=postgres dbname=postgres"
dst="host=127.0.0.1 port=$dst_port user=postgres dbname=postgres"
"$bin/shardctl" table add users --key id --method hash --key-type bigint >/dev/null
"$bin/shardctl" table create users --columns "id bigint PRIMARY KEY, n bigint NOT NULL DEFAULT 0, payload text" >/dev/null

# Partition 0 of 2 lives on the first server. Rows of ~250 bytes.
rows=$(( size_mb * 1024 * 1024 / 250 ))
echo "filling partition 0 on pg1 with about $size_mb MB ($rows rows)..." >&2
psql -q "$src" -c "INSERT INTO users_p0 SELECT g, g, repeat(md5(g::text), 6) FROM generate_series(1, $((rows * 2))) g WHERE satisfies_hash_partition('users'::regclass, 2, 0, g::bigint)"
psql -q "$src" -c "VACUUM ANALYZE users_p0"
bytes=$(psql -qAt "$src" -c "SELECT pg_total_relation_size('users_p0')")
mb=$(python3 -c "print(round($bytes / 1048576, 1))")

echo "baseline: COPY users_p0 TO STDOUT | COPY FROM STDIN on pg2..." >&2
psql -q "$dst" -c "CREATE TABLE users_copy (LIKE users INCLUDING ALL)"
start=$(date +%s.%N)
psql -q "$src" -c "COPY users_p0 TO STDOUT" | psql -q "$dst" -c "COPY users_copy FROM STDIN"
end=$(date +%s.%N)
copy_s=$(python3 -c "print($end - $start)")
psql -q "$dst" -c "DROP TABLE users_copy"

echo "move: shardctl move 0 --to pg2 --wait..." >&2
SHARDLINE_LOG=warn "$bin/shardline-rebalancer" --etcd "$etcd" > "$work/rebalancer.log" 2>&1 &
rebalancer_pid=$!
start=$(date +%s.%N)
"$bin/shardctl" move 0 --to pg2 --wait >/dev/null
end=$(date +%s.%N)
move_s=$(python3 -c "print($end - $start)")
job=$("$bin/shardctl" status --all --json | python3 -c "
import json,sys
jobs=json.load(sys.stdin)['jobs']
j=[j for j in jobs if j['partition']==0][-1]
print(json.dumps(j))")
copy_phase_s=$(python3 -c "
import json,sys
j=json.loads(sys.argv[1])
print((j['blocked_unix_ms'] if j.get('blocked_unix_ms') else j['updated_unix_ms']) / 1000 - j['progress']['copy_started_unix_ms'] / 1000)" "$job")
held=$(python3 -c "import json,sys; print(json.loads(sys.argv[1]).get('blocked_ms'))" "$job")

python3 - "$mb" "$copy_s" "$move_s" "$copy_phase_s" "$held" <<'PY'
import sys
mb, copy_s, move_s, copy_phase_s, held = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
print(f"partition size          : {mb:.0f} MB (table, indexes, TOAST)")
print(f"COPY | COPY baseline     : {copy_s:6.1f} s  {mb / copy_s:6.1f} MB/s")
print(f"move, submit to done    : {move_s:6.1f} s  {mb / move_s:6.1f} MB/s   ratio move/COPY {copy_s / move_s:.2f}")
print(f"move, copy to cutover   : {copy_phase_s:6.1f} s  {mb / copy_phase_s:6.1f} MB/s   ratio {copy_s / copy_phase_s:.2f}")
print(f"partition blocked       : {held} ms")
PY
