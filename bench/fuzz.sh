#!/usr/bin/env bash
# Runs the proxy's property-based fuzz tests (frame and message decoders,
# SQL lexer, statement analyser, router) for MINUTES minutes with fresh random
# seeds, and prints how many cases ran and whether any failed.
# Usage: bench/fuzz.sh [MINUTES]
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-10}
cases_per_run=20000
cargo test --release --locked -q -p proxy --test fuzz_decoders --no-run 2>/dev/null
binary=$(ls -t target/release/deps/fuzz_decoders-* | grep -v '\.d$' | head -1)
deadline=$(( $(date +%s) + minutes * 60 ))
runs=0
while [ "$(date +%s)" -lt "$deadline" ]; do
  if ! PROPTEST_CASES=$cases_per_run "$binary" -q > /tmp/shardline-fuzz.out 2>&1; then
    grep -E "minimal failing input|Test failed|panicked at" /tmp/shardline-fuzz.out | tail -5
    echo "fuzz: FAILED after $runs runs"
    exit 1
  fi
  runs=$((runs + 1))
done
tests=$("$binary" --list 2>/dev/null | grep -c ': test$')
echo "fuzz: $runs runs x $tests properties x $cases_per_run cases = $((runs * tests * cases_per_run)) cases in $minutes min, no failure"
