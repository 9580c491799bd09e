#!/usr/bin/env bash
# Takes regproxy off every node, in the only safe order:
#   1. delete the DaemonSet and wait until its pods are gone (`regproxy
#      serve` re-ensures the entries every reconcile interval);
#   2. on every node, a Job (pinned with nodeName) removes the /etc/hosts line
#      and the containerd hosts.toml, restoring the files as they were;
#   3. with --all, delete the rest of deploy/ (registry, Services, namespace).
# Usage: sysadmin/uninstall.sh [--image IMAGE] [--all]
# The Jobs run the image the DaemonSet runs, read from the cluster before it
# is deleted (so it is on every node already); --image only when the
# DaemonSet is gone already (a second run) or to override it.
# The cache in /var/lib/regproxy on each node is left; `rm -rf` it if wanted.
set -euo pipefail
cd "$(dirname "$0")"

image=""
all=false
while [ $# -gt 0 ]; do
  case "$1" in
    --image) image="$2"; shift 2 ;;
    --all) all=true; shift ;;
    *) echo "usage: $0 [--image IMAGE] [--all]" >&2; exit 2 ;;
  esac
done

if [ -z "$image" ]; then
  image=$(kubectl -n registry get daemonset regproxy --ignore-not-found \
    -o jsonpath='{.spec.template.spec.containers[?(@.name=="regproxy")].image}')
fi
if [ -z "$image" ]; then
  echo "no regproxy DaemonSet to read the image from: pass --image IMAGE (the image it ran)" >&2
  exit 2
fi
echo "the clean-up Jobs run $image"

echo "1/3 deleting the regproxy DaemonSet"
kubectl -n registry delete daemonset regproxy --ignore-not-found --wait=true
kubectl -n registry wait --for=delete pod -l app.kubernetes.io/name=regproxy --timeout=120s 2>/dev/null || true

echo "2/3 cleaning every node"
kubectl -n registry delete job -l app.kubernetes.io/name=regproxy-uninstall --ignore-not-found
nodes=$(kubectl get nodes -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}')
for node in $nodes; do
  sed -e "s|nodeName: NODE_NAME|nodeName: ${node}|" -e "s|image: REGPROXY_IMAGE|image: ${image}|" uninstall-job.yaml \
    | kubectl create -f - -o name
done
if ! kubectl -n registry wait --for=condition=complete job -l app.kubernetes.io/name=regproxy-uninstall --timeout=300s; then
  echo "some nodes were not cleaned; their logs:" >&2
  kubectl -n registry logs -l app.kubernetes.io/name=regproxy-uninstall --all-containers --prefix --tail=20 >&2 || true
  exit 1
fi
kubectl -n registry logs -l app.kubernetes.io/name=regproxy-uninstall --all-containers --prefix --tail=5

if $all; then
  echo "3/3 deleting the registry and the namespace"
  if [ -f ../deploy/base/peer-secret ] && [ -f ../deploy/base/admin-token ]; then
    kubectl delete -k ../deploy --ignore-not-found
  else
    # deploy/ does not render without the peers' secret and the admin token
    # files (made on the machine that installed it); everything it creates
    # is in the namespace.
    kubectl delete namespace registry --ignore-not-found
  fi
else
  echo "3/3 skipped: the registry keeps running (--all deletes it and the namespace)"
fi
