#!/usr/bin/env bash
# Checks that nodes pull knative.registry.svc.cluster.local/IMAGE through
# regproxy, with one Job per node (pinned with nodeName).
#   sysadmin/check.sh pull IMAGE     any runtime: the Job's own image is
#                                    IMAGE from the registry (push the regproxy
#                                    image there first, see README.md)
#   sysadmin/check.sh docker IMAGE   dockerd nodes: `docker pull` on the node's
#                                    docker socket
# Optional: NODES="node-1 node-2" to check only those.
set -euo pipefail
cd "$(dirname "$0")"
kind=${1:?usage: $0 pull|docker IMAGE}
image=${2:?usage: $0 pull|docker IMAGE}
case "$kind" in
  pull) template=check-pull-job.yaml ;;
  docker) template=check-docker-job.yaml ;;
  *) echo "usage: $0 pull|docker IMAGE" >&2; exit 2 ;;
esac

nodes=${NODES:-$(kubectl get nodes -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}')}
kubectl -n registry delete job -l app.kubernetes.io/name=regproxy-check --ignore-not-found >/dev/null
for node in $nodes; do
  sed -e "s|nodeName: NODE_NAME|nodeName: ${node}|" -e "s|CHECK_IMAGE|${image}|" "$template" \
    | kubectl create -f - -o name
done
failed=0
kubectl -n registry wait --for=condition=complete job -l app.kubernetes.io/name=regproxy-check --timeout=300s || failed=1
kubectl -n registry get pods -l app.kubernetes.io/name=regproxy-check \
  -o custom-columns=NODE:.spec.nodeName,PHASE:.status.phase,WAITING:.status.containerStatuses[0].state.waiting.reason
kubectl -n registry logs -l app.kubernetes.io/name=regproxy-check --prefix --tail=5 || true
exit $failed
