#!/usr/bin/env bash
# The whole test suite: installs what is missing (Debian packages; PyPI tools
# into a venv under target/), then runs every test. Needs root: the tests
# start dockerd and containerd of their own on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "scripts/test.sh starts dockerd and containerd: run it as root" >&2
  exit 1
fi
scripts/deps.sh
if [ -x scripts/validate-deploy.sh ]; then
  scripts/validate-deploy.sh
fi
cargo build --workspace --all-targets --locked
cargo test --workspace --locked
