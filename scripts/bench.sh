#!/usr/bin/env bash
# Reproduces BENCHMARKS.md in one command: installs what is missing
# (scripts/deps.sh), builds regproxy and loadtest in release, and runs the
# full `loadtest compare` (regproxy, nginx proxy_cache, Distribution's proxy
# mode and direct, each with a fresh cache, against one Distribution upstream
# on loopback and one in a bandwidth-limited network namespace).
# Writes loadtest/results/bench.{txt,json,svg}. Needs root (ip netns, tc).
# Extra arguments go to `loadtest compare` (see `loadtest compare --help`).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "bench.sh needs root: the uplink scenario creates a network namespace" >&2
  exit 1
fi
scripts/deps.sh
cargo build --release -p regproxy -p loadtest

out=loadtest/results
mkdir -p "$out"
# `scripts/bench.sh cluster [ARGS]`: only the cluster scenario (issue 11: N
# nodes in network namespaces behind one shaped uplink, peers on, off,
# direct, and a node killed), into loadtest/results/cluster.{txt,json,svg}.
if [ "${1:-}" = cluster ]; then
  shift
  target/release/loadtest compare --scenarios cluster \
    --regproxy-bin target/release/regproxy \
    --json "$out/cluster.json" \
    --cluster-svg "$out/cluster.svg" \
    "$@" | tee "$out/cluster.txt"
  exit 0
fi
target/release/loadtest compare \
  --regproxy-bin target/release/regproxy \
  --json "$out/bench.json" \
  --svg "$out/bench.svg" \
  "$@" | tee "$out/bench.txt"
