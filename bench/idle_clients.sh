#!/usr/bin/env bash
# Memory per idle client connection: opens N (default 1000) logged-in client
# connections through the proxy, keeps them idle, and prints the proxy's RSS
# before and after and the difference per connection. Baseline in the same
# run: the same for pgbouncer (transaction pooling) when it is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
clients=${1:-1000}
ulimit -n $((clients * 2 + 256)) 2>/dev/null || true
cargo build --release --locked -q -p shardctl -p proxy
bin=target/release
work=$(mktemp -d /tmp/shardline-idle.XXXXXX)
chmod 755 "$work"
cleanup() {
  [ -n "${proxy_pid:-}" ] && kill "$proxy_pid" 2>/dev/null || true
  [ -n "${bouncer_pid:-}" ] && kill "$bouncer_pid" 2>/dev/null || true
  "$bin/shardctl" dev down --dir "$work/cluster" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
export SHARDLINE_CONFIG="$work/cluster/shardline.toml"
"$bin/shardctl" dev up --dir "$work/cluster" --servers 1 --partitions 16 --json > "$work/dev.json"
pg_port=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['servers'][0]['port'])" "$work/dev.json")
etcd=$(python3 -c "import json,sys; print('http://127.0.0.1:%d' % json.load(open(sys.argv[1]))['etcd']['client_port'])" "$work/dev.json")
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
proxy_port=$(free_port)
SHARDLINE_LOG=warn "$bin/shardline-proxy" --etcd "$etcd" --listen "127.0.0.1:$proxy_port" --auth-method trust > "$work/proxy.log" 2>&1 &
proxy_pid=$!

bouncer_port=""
if command -v pgbouncer >/dev/null 2>&1; then
  bouncer_port=$(free_port)
  mkdir -p "$work/bouncer"
  cat > "$work/bouncer/pgbouncer.ini" <<INI
[databases]
postgres = host=127.0.0.1 port=$pg_port dbname=postgres user=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $bouncer_port
unix_socket_dir =
auth_type = trust
auth_file = $work/bouncer/userlist.txt
pool_mode = transaction
default_pool_size = 20
max_client_conn = $((clients + 100))
logfile = $work/bouncer/pgbouncer.log
INI
  echo '"postgres" ""' > "$work/bouncer/userlist.txt"
  chown -R postgres "$work/bouncer" 2>/dev/null || true
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- bash -c "ulimit -n $((clients * 2 + 256)); exec pgbouncer $work/bouncer/pgbouncer.ini" >/dev/null 2>&1 &
  else
    pgbouncer "$work/bouncer/pgbouncer.ini" >/dev/null 2>&1 &
  fi
  bouncer_pid=$!
fi
sleep 1

measure() { # name pid port
  python3 - "$1" "$2" "$3" "$clients" <<'PY'
import sys, time, psycopg
name, pid, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def rss_kib():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
warm = psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres")
warm.execute("SELECT 1")
time.sleep(0.5)
before = rss_kib()
conns = [psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres") for _ in range(n)]
conns[0].execute("SELECT 1")
time.sleep(1.0)
after = rss_kib()
print(f"{name:10s} RSS before {before:8d} KiB  with {n} idle clients {after:8d} KiB  per client {(after - before) * 1024 / n:8.0f} bytes")
for c in conns:
    c.close()
warm.close()
PY
}
measure shardline "$proxy_pid" "$proxy_port"
if [ -n "$bouncer_port" ]; then
  measure pgbouncer "$(pgrep -f "^pgbouncer $work/bouncer/pgbouncer.ini" | head -1)" "$bouncer_port"
fi
