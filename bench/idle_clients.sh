#!/usr/bin/env bash
# Memory per idle client connection: opens N (default 1000) logged-in client
# connections through the proxy, keeps them idle, and prints the proxy's RSS
# before and after and the difference per connection. Baseline in the same
# run: the same for pgbouncer (transaction pooling) when it is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
clients=${1:-1000}
ulimit -n $((clients * 2 + 256)) 2>/dev/null || true
. bench/lib.sh
bench_cluster shardline-idle
start_proxy
bouncer_port=""
if command -v pgbouncer >/dev/null 2>&1; then
  start_pgbouncer $((clients + 100))
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
  measure pgbouncer "$bouncer_pid" "$bouncer_port"
fi
