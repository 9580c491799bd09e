#!/usr/bin/env bash
# Builds a statically linked regproxy and a FROM scratch image TAG with it,
# pulling nothing from any image registry: the root filesystem is assembled
# here and handed to `docker import`.
#   deploy/build-image.sh regproxy:0.1.0
# The image holds /regproxy (the entrypoint), Debian's CA bundle at
# /etc/ssl/certs/ca-certificates.crt (trusted for https upstreams on top of
# the built-in Mozilla roots, through REGPROXY_UPSTREAM_CA) and an
# /etc/nsswitch.conf for `--upstream-resolver system`. The container runtime
# provides /etc/hosts and /etc/resolv.conf.
# Needs: cargo, docker (DOCKER_HOST is honoured), file, ca-certificates.
set -euo pipefail
cd "$(dirname "$0")/.."

tag=${1:?usage: deploy/build-image.sh TAG}
target=x86_64-unknown-linux-gnu
ca=/etc/ssl/certs/ca-certificates.crt

# glibc, statically: no musl target is needed. getaddrinfo in a static glibc
# cannot load NSS modules, which is one reason for `--upstream-resolver dns`.
RUSTFLAGS='-C target-feature=+crt-static' \
  cargo build --release --locked -p regproxy --bin regproxy --target "$target"
bin="target/$target/release/regproxy"

if ! file -L "$bin" | grep -Eq 'statically linked|static-pie linked'; then
  echo "build-image: $bin is not statically linked: $(file -L "$bin")" >&2
  exit 1
fi
if ldd "$bin" >/dev/null 2>&1 && ! ldd "$bin" 2>&1 | grep -q 'statically linked'; then
  echo "build-image: ldd finds shared libraries in $bin:" >&2
  ldd "$bin" >&2
  exit 1
fi
[ -s "$ca" ] || { echo "build-image: $ca is missing (apt-get install ca-certificates)" >&2; exit 1; }

rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
mkdir -p "$rootfs/etc/ssl/certs"
if command -v strip >/dev/null; then
  strip -o "$rootfs/regproxy" "$bin"
else
  cp "$bin" "$rootfs/regproxy"
fi
chmod 0755 "$rootfs/regproxy"
cp "$ca" "$rootfs/etc/ssl/certs/ca-certificates.crt"
printf 'hosts: files dns\n' > "$rootfs/etc/nsswitch.conf"
chmod -R go-w "$rootfs"

tar -C "$rootfs" --owner=0 --group=0 --numeric-owner --sort=name -c . \
  | docker import \
      --change 'ENTRYPOINT ["/regproxy"]' \
      --change 'CMD ["--help"]' \
      --change "ENV REGPROXY_UPSTREAM_CA=/etc/ssl/certs/ca-certificates.crt" \
      --change 'LABEL org.opencontainers.image.title=regproxy' \
      --message "regproxy $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
      - "$tag" >/dev/null
echo "built $tag: $(du -h "$rootfs/regproxy" | cut -f1) static regproxy, FROM scratch"
