#!/usr/bin/env bash
# The main job, end to end on loopback: a real upstream registry, regproxy in
# front of it, and a real dockerd that pulls one image twice by the cluster
# name. Prints the bytes that came from upstream and from the node cache.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root: the demo starts its own dockerd" >&2; exit 1; }
scripts/deps.sh
cargo build --release -p regproxy --locked
BIN=$PWD/target/release/regproxy

W=$(mktemp -d /tmp/regproxy-demo.XXXXXX)
NAME=knative.registry.svc.cluster.local
UP=127.0.0.1:15500 PROXY=127.0.0.1:15580 ADMIN=127.0.0.1:15590
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  umount -R "$W/exec" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
wait_port() { for _ in $(seq 200); do (echo >/dev/tcp/${1%:*}/${1#*:}) 2>/dev/null && return; sleep 0.1; done; echo "nothing listens on $1" >&2; exit 1; }

echo "== upstream: Debian's docker-registry on $UP"
cat > "$W/registry.yml" <<YML
version: 0.1
log: {level: info}
storage: {filesystem: {rootdirectory: $W/upstream}}
http: {addr: $UP}
YML
docker-registry serve "$W/registry.yml" > "$W/registry.log" 2>&1 & pids+=($!)
wait_port $UP

echo "== regproxy on $PROXY (admin $ADMIN), cache in $W/cache"
"$BIN" serve --listen $PROXY --upstream http://$UP --cache-dir "$W/cache" --cache-size 1GiB \
  --admin-listen $ADMIN > "$W/regproxy.log" 2>&1 & pids+=($!)
wait_port $PROXY

echo "== dockerd, with '127.0.0.1 $NAME' in its /etc/hosts (a private mount namespace)"
printf '127.0.0.1 localhost\n127.0.0.1 %s\n' $NAME > "$W/hosts"
unshare --mount --propagation private sh -c "mount --bind $W/hosts /etc/hosts && exec dockerd \
  --data-root $W/docker --exec-root $W/exec --pidfile $W/docker.pid -H unix://$W/docker.sock \
  --iptables=false --ip6tables=false --bridge=none --storage-driver=vfs" > "$W/dockerd.log" 2>&1 & pids+=($!)
export DOCKER_HOST=unix://$W/docker.sock DOCKER_CONFIG=$W/client
for _ in $(seq 150); do /usr/bin/docker version >/dev/null 2>&1 && break; sleep 0.2; done
docker() { /usr/bin/docker "$@"; }

echo "== an image of 64 MiB, made without network, pushed to the upstream"
mkdir -p "$W/rootfs/app"
head -c $((64 << 20)) /dev/urandom > "$W/rootfs/app/data.bin"
tar c -C "$W/rootfs" . | docker import - $UP/team/app:v1 >/dev/null
docker push -q $UP/team/app:v1 >/dev/null
docker rmi -f $UP/team/app:v1 >/dev/null

metric() { curl -s http://$ADMIN/metrics | awk -v m="$1" '$1 == m {print $2}'; }
up0=0 node0=0
report() {
  local up node; up=$(metric regproxy_upstream_bytes_total); node=$(metric regproxy_served_cache_bytes_total)
  printf '   %-22s %12s bytes from upstream   %12s bytes from the node cache\n' "$1" $((up - up0)) $((node - node0))
  up0=$up node0=$node
}
IMG=$NAME:${PROXY#*:}/team/app:v1
echo "== docker pull $IMG, twice (docker rmi in between)"
docker pull -q $IMG >/dev/null; report "first pull (cold):"
docker rmi $IMG >/dev/null
docker pull -q $IMG >/dev/null; report "second pull (warm):"
echo "== the second pull never left the node: its layers came from $W/cache"
