#!/usr/bin/env bash
# Builds PgCat (https://github.com/postgresml/pgcat), the pooler the workload
# bench compares with, into a cache directory and prints the binary's path.
# PgCat is only used as a binary here: none of its code or text enters this
# repository.
#
# The source is the checkout (or git directory) given as argument or in
# PGCAT_SRC; without either it is cloned from GitHub into a temp dir. The
# build runs on a copy, with PgCat's rust-toolchain pin removed so the
# installed toolchain builds it, through `flock /tmp/shardline-cargo.lock`
# like every cargo command of the benches. A cached binary is reused unless
# REBUILD=1. The bench scripts find the cached binary by themselves
# (or take PGCAT=/path/to/pgcat).
#
# Env: PGCAT_CACHE (default ~/.cache/shardline-bench/pgcat), PGCAT_TARGET_DIR
# (cargo's target dir, default $PGCAT_CACHE/target), REBUILD=1.
#
# Usage: bench/pgcat.sh [PGCAT_CHECKOUT]      e.g.  PGCAT=$(bench/pgcat.sh) bench/workload.sh
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
cache="${PGCAT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/shardline-bench/pgcat}"
src_arg="${1:-${PGCAT_SRC:-}}"
if [ -x "$cache/pgcat" ] && [ "${REBUILD:-0}" != 1 ]; then
  echo "$cache/pgcat"
  exit 0
fi
mkdir -p "$cache"
tmp=$(mktemp -d /tmp/pgcat-build.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
if [ -z "$src_arg" ]; then
  echo "cloning https://github.com/postgresml/pgcat" >&2
  git clone -q --depth 1 https://github.com/postgresml/pgcat "$tmp/src" >&2
elif git -C "$src_arg" rev-parse --git-dir >/dev/null 2>&1; then
  git clone -q "$src_arg" "$tmp/src" >&2
else
  cp -r "$src_arg" "$tmp/src"
fi
rm -f "$tmp/src"/rust-toolchain "$tmp/src"/rust-toolchain.toml
commit=$(git -C "$tmp/src" rev-parse HEAD 2>/dev/null || echo unknown)
echo "building PgCat $commit (a few minutes)" >&2
(cd "$tmp/src" && CARGO_TARGET_DIR="${PGCAT_TARGET_DIR:-$cache/target}" bench_cargo build --release --locked -q >&2)
cp "${PGCAT_TARGET_DIR:-$cache/target}/release/pgcat" "$cache/pgcat.new"
mv "$cache/pgcat.new" "$cache/pgcat"
echo "$commit" > "$cache/pgcat.commit"
echo "$cache/pgcat"
