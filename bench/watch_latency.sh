#!/usr/bin/env bash
# How fast a map change reaches a watching process: starts a private etcd,
# makes N compare-and-swap changes to a 1024-partition map, and prints the
# median and p99 of (write ack -> watcher applied) next to the write's own
# round trip measured in the same run, with their ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -q -p shardline-tests --bin watch-latency
./target/release/watch-latency "${1:-1000}"
