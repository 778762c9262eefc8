# shellcheck shell=bash
# Shared setup of the bench scripts (sourced, not run): a one-server dev
# cluster in a temp dir, the proxy and pgbouncer in front of it, and cleanup
# of all of it on exit. Callers run from the repository root.

bin=target/release

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# cargo, serialized with other builds on the machine when flock exists
# (shared build hosts: never two builds at once).
bench_cargo() {
  if command -v flock >/dev/null 2>&1; then
    flock /tmp/shardline-cargo.lock cargo "$@"
  else
    cargo "$@"
  fi
}

# Exits with 2, saying which Debian package has it, unless COMMAND exists.
need_command() { # command package
  command -v "$1" >/dev/null 2>&1 && return 0
  echo "$(basename "$0") needs $1: apt-get install $2" >&2
  exit 2
}

# Exits with 2 unless every word of MODES is a pgbench -M mode.
check_modes() { # modes
  local m
  for m in $1; do
    case "$m" in simple|extended|prepared) ;; *) echo "unknown mode $m: simple, extended or prepared" >&2; exit 2 ;; esac
  done
}

# Installs pgbouncer (the Debian package) when it is missing.
ensure_pgbouncer() {
  command -v pgbouncer >/dev/null 2>&1 && return 0
  echo "installing pgbouncer (Debian package) for the comparison" >&2
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq pgbouncer >/dev/null
}

# Builds, starts the cluster; sets work, pg_port, etcd.
bench_cluster() { # temp-dir-prefix [servers] [partitions]
  # BENCH_NO_BUILD=1 runs the binaries as they are (say, a baseline's).
  [ -n "${BENCH_NO_BUILD:-}" ] || bench_cargo build --release --locked -q -p shardctl -p proxy -p rebalancer
  work=$(mktemp -d "/tmp/$1.XXXXXX")
  chmod 755 "$work"
  trap bench_cleanup EXIT
  export SHARDLINE_CONFIG="$work/cluster/shardline.toml"
  "$bin/shardctl" dev up --dir "$work/cluster" --servers "${2:-1}" --partitions "${3:-16}" --json > "$work/dev.json"
  pg_port=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['servers'][0]['port'])" "$work/dev.json")
  etcd=$(python3 -c "import json,sys; print('http://127.0.0.1:%d' % json.load(open(sys.argv[1]))['etcd']['client_port'])" "$work/dev.json")
}

# pgbench's tables at SCALE on the cluster's first server, declared in the
# map as a sharded application would: pgbench_accounts sharded by aid, the
# other pgbench tables homed on pg1.
bench_pgbench_schema() { # scale
  pgbench -i -q -s "$1" -h 127.0.0.1 -p "$pg_port" -U postgres postgres >/dev/null 2>&1
  "$bin/shardctl" table add pgbench_accounts --key aid --method hash --key-type int >/dev/null
  for t in branches tellers history; do "$bin/shardctl" table add "pgbench_$t" --home pg1 >/dev/null; done
}

bench_cleanup() {
  if [ -n "${proxy_pid:-}" ]; then kill "$proxy_pid" 2>/dev/null || true; fi
  if [ -n "${rebalancer_pid:-}" ]; then kill "$rebalancer_pid" 2>/dev/null || true; fi
  if [ -n "${bouncer_pid:-}" ]; then kill "$bouncer_pid" 2>/dev/null || true; fi
  if [ -n "${pgcat_pid:-}" ]; then kill "$pgcat_pid" 2>/dev/null || true; fi
  if [ -n "${baseline_pid:-}" ]; then kill "$baseline_pid" 2>/dev/null || true; fi
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
# for up to MAX_CLIENTS clients on TCP; sets bouncer_port, bouncer_pid
# (pgbouncer's own pid). SERVER_HOST (default 127.0.0.1) is where it reaches
# Postgres: a directory means Postgres's Unix socket in it. NAME (default
# bouncer) is its directory in $work, to run two side by side.
start_pgbouncer() { # max-clients [server-host] [name]
  bouncer_port=$(free_port)
  local dir="$work/${3:-bouncer}"
  mkdir -p "$dir"
  cat > "$dir/pgbouncer.ini" <<INI
[databases]
postgres = host=${2:-127.0.0.1} port=$pg_port dbname=postgres user=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $bouncer_port
unix_socket_dir =
auth_type = trust
auth_file = $dir/userlist.txt
pool_mode = transaction
default_pool_size = 20
max_client_conn = $1
logfile = $dir/pgbouncer.log
INI
  echo '"postgres" ""' > "$dir/userlist.txt"
  chown -R postgres "$dir" 2>/dev/null || true
  local start="ulimit -n $(($1 * 2 + 256)) 2>/dev/null; exec pgbouncer $dir/pgbouncer.ini"
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- bash -c "$start" >/dev/null 2>&1 &
  else
    bash -c "$start" >/dev/null 2>&1 &
  fi
  sleep 1
  bouncer_pid=$(pgrep -f "^pgbouncer $dir/pgbouncer.ini" | head -1)
}

# The PgCat binary to compare with: $PGCAT if set, else the build that
# bench/pgcat.sh caches; empty (and a note on stderr) when there is none.
pgcat_binary() {
  local cached="${PGCAT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/shardline-bench/pgcat}/pgcat"
  if [ -n "${PGCAT:-}" ]; then
    [ -x "$PGCAT" ] && { echo "$PGCAT"; return; }
    echo "PGCAT=$PGCAT is not an executable: no PgCat columns" >&2
  elif [ -x "$cached" ]; then
    echo "$cached"
  else
    echo "no PgCat (set PGCAT, or build it with bench/pgcat.sh): no PgCat columns" >&2
  fi
}

# Starts PgCat (binary $1) as a plain pooler in front of the cluster's first
# server: transaction pooling, trust auth, 20 server connections, the query
# parser off, its prepared-statement cache on (so -M prepared works), as many
# worker threads as cores (PGCAT_THREADS to change). Clients connect as
# postgres to database postgres. Sets pgcat_port, pgcat_pid.
start_pgcat() { # binary
  pgcat_port=$(free_port)
  mkdir -p "$work/pgcat"
  cat > "$work/pgcat/pgcat.toml" <<TOML
[general]
host = "127.0.0.1"
port = $pgcat_port
enable_prometheus_exporter = false
worker_threads = ${PGCAT_THREADS:-$(nproc)}
connect_timeout = 5000
log_client_connections = false
log_client_disconnections = false
admin_username = "pgcat_admin"
admin_password = "pgcat_admin"

[pools.postgres]
pool_mode = "transaction"
default_role = "primary"
query_parser_enabled = false
prepared_statements_cache_size = 500

[pools.postgres.users.0]
username = "postgres"
password = "postgres"
auth_type = "trust"
pool_size = 20
min_pool_size = 0
statement_timeout = 0

[pools.postgres.shards.0]
servers = [["127.0.0.1", $pg_port, "primary"]]
database = "postgres"
TOML
  "$1" --log-level warn --no-color "$work/pgcat/pgcat.toml" > "$work/pgcat/pgcat.log" 2>&1 &
  pgcat_pid=$!
  wait_for_port "$pgcat_port" 5 && return 0
  echo "PgCat did not start (log: $work/pgcat/pgcat.log)" >&2
  return 1
}

# Succeeds once something accepts connections on 127.0.0.1:PORT; fails
# after SECONDS.
wait_for_port() { # port seconds
  local _
  for _ in $(seq $(($2 * 10))); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

# Runs pgbench with ARGS; appends its tps to FILE, or "fail" (and, once, its
# first errors — not its version line nor the abort notes — to FILE.err).
pgbench_tps() { # file args...
  local file=$1 out
  shift
  if out=$(pgbench "$@" 2>&1) && [[ "$out" == *$'\ntps = '* ]]; then
    awk '/^tps = / && !done {print $3; done = 1}' <<< "$out" >> "$file"
  else
    echo fail >> "$file"
    [ -e "$file.err" ] || awk '/ERROR|FATAL|error/ && !/^pgbench \(|Run was aborted/ && n < 2 {sub(/client [0-9]+ script [0-9]+ aborted in command [0-9]+ query [0-9]+: /, ""); if (!seen[$0]++) {print; n++}}' <<< "$out" > "$file.err"
  fi
}

# The indexes 0..COUNT-1 in the order round ROUND (from 0) runs its targets:
# each round starts one target later than the round before. A run leaves
# Postgres dead rows, WAL and autovacuum work to whatever runs next; in a
# fixed order the same target would inherit them every round.
round_order() { # round count
  local k
  for k in $(seq 0 $(($2 - 1))); do echo $((($1 + k) % $2)); done
}

median_of() { # file -> median of its numbers, or "fail"
  { grep -v fail "$1" 2>/dev/null || true; } | sort -g | awk '{a[NR]=$1} END {if (NR==0) print "fail"; else printf "%.0f\n", a[int((NR+1)/2)]}'
}

# One line: LABEL, then the per-round ratios of two files of per-round tps
# (same order of rounds), with their median and range; rounds where either
# failed are left out.
paired_ratios() { # numerator-file denominator-file label
  python3 - "$@" <<'PY'
import statistics, sys
def read(path):
    with open(path) as f:
        return [line.strip() for line in f]
top, bottom, label = read(sys.argv[1]), read(sys.argv[2]), sys.argv[3]
ratios = [float(a) / float(b) for a, b in zip(top, bottom) if "fail" not in (a, b) and float(b) > 0]
if ratios:
    rounds = " ".join("%.2f" % r for r in ratios)
    print("%s per round: %s (median %.2f, range %.2f-%.2f)" % (label, rounds, statistics.median(ratios), min(ratios), max(ratios)))
PY
}
ratio() { python3 -c "import sys; a,b=sys.argv[1],sys.argv[2]; print('n/a' if 'fail' in (a,b) else '%.2f' % (float(a)/float(b)))" "$1" "$2"; }

# Starts BASELINE_PROXY (another shardline-proxy binary, say an earlier
# commit's) beside the proxy, if it is set, with BASELINE_CONFIG as its
# config file if that is set (the same binary with a setting changed); sets
# baseline_port, baseline_pid (empty when it is not set).
# shellcheck disable=SC2034 # baseline_port and baseline_pid are for the caller
start_baseline() {
  baseline_pid=""
  baseline_port=""
  [ -n "${BASELINE_PROXY:-}" ] || return 0
  baseline_port=$(free_port)
  local config=()
  [ -n "${BASELINE_CONFIG:-}" ] && config=(--config "$BASELINE_CONFIG")
  SHARDLINE_LOG=warn "$BASELINE_PROXY" "${config[@]}" --etcd "$etcd" --listen "127.0.0.1:$baseline_port" \
    --auth-method trust > "$work/baseline.log" 2>&1 &
  baseline_pid=$!
}

# The targets a pooler-comparing script runs pgbench against, in order:
# names, ports and the pooler process of each ("-": none, pgbench talks to
# Postgres). Scripts append with add_target.
names=()
ports=()
pids=()
add_target() { # name port pid
  names+=("$1")
  ports+=("$2")
  pids+=("$3")
}

# Appends the optional targets: the baseline proxy when start_baseline
# started one, then PgCat when its binary is given and it starts.
add_optional_targets() { # pgcat-binary (may be empty)
  if [ -n "$baseline_port" ]; then add_target baseline "$baseline_port" "$baseline_pid"; fi
  if [ -n "$1" ] && start_pgcat "$1"; then add_target pgcat "$pgcat_port" "$pgcat_pid"; fi
  return 0
}

# The setup of the benches that compare poolers on pgbench's TPC-B-like
# transaction: the cluster (temp dir PREFIX) with pgbench's tables at scale
# 10, then the targets in this order: `direct` when asked, the proxy, pgbouncer
# unless MODES is prepared alone (it cannot run pgbench's prepared mode in
# transaction pooling), the baseline proxy when BASELINE_PROXY is set, PgCat
# when a build is found.
start_tpcb_targets() { # prefix modes [direct]
  check_modes "$2"
  ensure_pgbouncer
  local pgcat
  pgcat=$(pgcat_binary)
  bench_cluster "$1"
  bench_pgbench_schema 10
  # shellcheck disable=SC2119 # no config file: the defaults
  start_proxy
  start_baseline
  if [ "${3:-}" = direct ]; then add_target direct "$pg_port" -; fi
  add_target proxy "$proxy_port" "$proxy_pid"
  if [ "$2" != prepared ]; then
    start_pgbouncer 1000
    add_target pgbouncer "$bouncer_port" "$bouncer_pid"
  fi
  add_optional_targets "$pgcat"
  sleep 1
}

# The number of transactions pgbench's output says it processed.
pgbench_transactions() { # pgbench-output
  awk -F': ' '/number of transactions actually processed/ {split($2, a, "/"); print a[1]}' <<< "$1"
}
