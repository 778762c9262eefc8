#!/usr/bin/env bash
# Memory per idle client connection: opens IDLE (default 1000) logged-in
# client connections through the proxy and keeps them idle; then, with
# ACTIVE > 0, runs `pgbench -S -c ACTIVE -j 2 -T SECONDS` through the same
# proxy while the idle clients stay connected; then has every idle client run
# one query and go idle again. Prints the proxy's RSS before, with the idle
# clients, during the active load (the highest sample), after it, and after
# the idle clients' query, with the bytes per idle client. Baseline in the
# same run: the same for pgbouncer (transaction pooling) when it is installed.
#
# Usage: bench/idle_clients.sh [IDLE] [ACTIVE] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
clients=${1:-1000}
active=${2:-0}
secs=${3:-10}
total=$((clients + active + 100))
ulimit -n $((total * 2 + 1024)) 2>/dev/null || true
. bench/lib.sh
bench_cluster shardline-idle
if [ "$active" -gt 0 ]; then
  bench_pgbench_schema 1
fi
# The default max_clients (10,000) would refuse the last clients of a
# 10,000 + 1,000 run. The pool keeps its default size (20): ACTIVE clients
# queue for its connections, within the checkout timeout for one-statement
# transactions (pgbench reports any that fail).
printf '[limits]\nmax_clients = %d\n' "$total" > "$work/idle.toml"
start_proxy "$work/idle.toml"
bouncer_port=""
if command -v pgbouncer >/dev/null 2>&1; then
  start_pgbouncer "$total"
fi
sleep 1

measure() { # name pid port
  python3 - "$1" "$2" "$3" "$clients" "$active" "$secs" <<'PY'
import subprocess, sys, time, psycopg
name, pid, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
n, active, secs = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
def rss_kib():
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
retries = 0
def connect():
    # A burst of thousands of connects can overflow a listen backlog; a
    # lost SYN is a timeout, not a refusal: try again, and say so.
    global retries
    for attempt in range(3):
        try:
            return psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=10", autocommit=True)
        except psycopg.OperationalError:
            if attempt == 2:
                raise
            retries += 1
def per_client(kib, base):
    return (kib - base) * 1024 / n
warm = connect()
warm.execute("SELECT 1")
time.sleep(0.5)
before = rss_kib()
conns = []
try:
    for _ in range(n):
        conns.append(connect())
except psycopg.OperationalError as e:
    # pgbouncer's connects time out past a few thousand on a small machine:
    # say how far it got instead of ending in a traceback.
    print(f"{name:10s} connects fail after {len(conns)} of {n} idle clients: {str(e).strip()}", flush=True)
    for c in conns:
        c.close()
    sys.exit(0)
time.sleep(1.0)
idle = rss_kib()
print(f"{name:10s} RSS before {before:8d} KiB  with {n} idle clients {idle:8d} KiB  per idle client {per_client(idle, before):6.0f} bytes"
      + (f"  ({retries} connects retried)" if retries else ""), flush=True)
if active > 0:
    run = subprocess.Popen(
        ["pgbench", "-n", "-S", "-c", str(active), "-j", "2", "-T", str(secs),
         "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "postgres"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = idle
    while run.poll() is None:
        peak = max(peak, rss_kib())
        time.sleep(0.25)
    output = run.stdout.read()
    tps = [l for l in output.splitlines() if l.startswith(("tps =", "number of failed", "number of transactions actually"))]
    errors = [l for l in output.splitlines() if "error" in l.lower() or "fatal" in l.lower()]
    time.sleep(1.0)
    after = rss_kib()
    print(f"{name:10s}   pgbench -S -c {active} -j 2 -T {secs} (exit {run.returncode}): " + "; ".join(tps), flush=True)
    for line in errors[:5]:
        print(f"{name:10s}   {line}")
    print(f"{name:10s}   RSS during {active} active + {n} idle {peak:8d} KiB (peak)  after {after:8d} KiB  per idle client after {per_client(after, before):6.0f} bytes", flush=True)
for c in conns:
    c.execute("SELECT 1")
# Past the proxy's idle threshold (session::IDLE_AFTER, 500 ms) for all of them.
time.sleep(3.0)
queried = rss_kib()
print(f"{name:10s}   RSS after each idle client ran one query {queried:8d} KiB  per idle client {per_client(queried, before):6.0f} bytes", flush=True)
for c in conns:
    c.close()
warm.close()
PY
}
measure shardline "$proxy_pid" "$proxy_port"
if [ -n "$bouncer_port" ]; then
  measure pgbouncer "$bouncer_pid" "$bouncer_port"
fi
