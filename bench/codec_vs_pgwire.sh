#!/usr/bin/env bash
# Why the proxy's wire codec is hand-written rather than pgwire's `messages`
# module: builds bench/codec (a standalone crate linking the proxy's real
# `wire` framing and decoders and pgwire with no features) with the
# workspace's release profile, and prints, for an extended-protocol request
# (Parse+Bind+Describe+Execute+Sync, as pgbench -M extended sends it) and a
# prepared one (Bind+Execute+Sync):
#   - median ns/request and heap allocations/request of: the proxy's framing
#     and decoding; pgwire's decoding; each plus forwarding (the proxy copies
#     `frame.raw`, pgwire must re-encode), and the ratio pgwire/proxy;
#   - whether pgwire's re-encoding reproduces the received bytes;
#   - what each does with a few malformed requests (refused, accepted, panic).
# Machines are shared and noisy: compare figures within one run only.
#
# Usage: bench/codec_vs_pgwire.sh [REQUESTS_PER_REPETITION] [REPETITIONS]
# (defaults 2000000 and 5). Honours CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/codec"
cargo build --release -q
target=${CARGO_TARGET_DIR:-target}
pgwire=$(awk '/^name = "pgwire"$/ { getline; gsub(/"/, "", $3); print $3 }' Cargo.lock)
echo "shardline proxy::wire vs pgwire $pgwire messages (default-features = false)"
"$target/release/codec-bench" "$@"
