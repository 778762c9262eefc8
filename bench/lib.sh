# Shared setup of the bench scripts (sourced, not run): a one-server dev
# cluster in a temp dir, the proxy and pgbouncer in front of it, and cleanup
# of all of it on exit. Callers run from the repository root.

bin=target/release

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Builds, starts the cluster; sets work, pg_port, etcd.
bench_cluster() { # temp-dir-prefix [servers] [partitions]
  # Builds share one lock when flock is there: two cargo builds at once on a
  # small machine each take far longer than one after the other.
  local lock=""
  command -v flock >/dev/null 2>&1 && lock="flock /tmp/shardline-cargo.lock"
  # BENCH_NO_BUILD=1 runs the binaries as they are (say, a baseline's).
  [ -n "${BENCH_NO_BUILD:-}" ] || $lock cargo build --release --locked -q -p shardctl -p proxy -p rebalancer
  work=$(mktemp -d "/tmp/$1.XXXXXX")
  chmod 755 "$work"
  trap bench_cleanup EXIT
  export SHARDLINE_CONFIG="$work/cluster/shardline.toml"
  "$bin/shardctl" dev up --dir "$work/cluster" --servers "${2:-1}" --partitions "${3:-16}" --json > "$work/dev.json"
  pg_port=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['servers'][0]['port'])" "$work/dev.json")
  etcd=$(python3 -c "import json,sys; print('http://127.0.0.1:%d' % json.load(open(sys.argv[1]))['etcd']['client_port'])" "$work/dev.json")
}

bench_cleanup() {
  [ -n "${proxy_pid:-}" ] && kill "$proxy_pid" 2>/dev/null || true
  [ -n "${rebalancer_pid:-}" ] && kill "$rebalancer_pid" 2>/dev/null || true
  [ -n "${bouncer_pid:-}" ] && kill "$bouncer_pid" 2>/dev/null || true
  "$bin/shardctl" dev down --dir "$work/cluster" >/dev/null 2>&1 || true
  rm -rf "$work"
}

# Starts the proxy (trust auth), with a config file if given; sets
# proxy_port, proxy_pid.
start_proxy() { # [config-file]
  proxy_port=$(free_port)
  local config=()
  [ -n "${1:-}" ] && config=(--config "$1")
  SHARDLINE_LOG=warn "$bin/shardline-proxy" "${config[@]}" --etcd "$etcd" --listen "127.0.0.1:$proxy_port" --auth-method trust \
    > "$work/proxy.log" 2>&1 &
  proxy_pid=$!
}

# Starts pgbouncer in transaction pooling (trust auth, 20 server connections)
# for up to MAX_CLIENTS clients; sets bouncer_port, bouncer_pid (pgbouncer's own pid).
start_pgbouncer() { # max-clients
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
max_client_conn = $1
logfile = $work/bouncer/pgbouncer.log
INI
  echo '"postgres" ""' > "$work/bouncer/userlist.txt"
  chown -R postgres "$work/bouncer" 2>/dev/null || true
  local start="ulimit -n $(($1 * 2 + 256)) 2>/dev/null; exec pgbouncer $work/bouncer/pgbouncer.ini"
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- bash -c "$start" >/dev/null 2>&1 &
  else
    bash -c "$start" >/dev/null 2>&1 &
  fi
  sleep 1
  bouncer_pid=$(pgrep -f "^pgbouncer $work/bouncer/pgbouncer.ini" | head -1)
}
