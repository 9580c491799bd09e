#!/usr/bin/env bash
# The whole test suite: installs what is missing (Debian packages; PyPI tools
# into a venv under target/), then runs every test. Needs root: the tests
# start dockerd and containerd of their own on loopback.
#
# scripts/test.sh --stress: the same set-up and one build, then the whole
# suite four times in a row on a starved machine: twice pinned to one core
# (taskset -c 0), then twice beside a CPU hog on both cores (stress-ng, with
# a timeout of its own, stopped when the run ends). Prints each run's wall
# time and test counts; exits non-zero if any run failed. Logs go to
# target/stress/. Too long for CI: .ci/run does not use it.
set -euo pipefail
cd "$(dirname "$0")/.."

stress=0
case "${1:-}" in
  "") ;;
  --stress) stress=1 ;;
  *)
    echo "usage: scripts/test.sh [--stress]" >&2
    exit 2
    ;;
esac

if [ "$(id -u)" != 0 ]; then
  echo "scripts/test.sh starts dockerd and containerd: run it as root" >&2
  exit 1
fi
scripts/deps.sh
if [ -x scripts/validate-deploy.sh ]; then
  scripts/validate-deploy.sh
fi
cargo build --workspace --all-targets --locked
if [ "$stress" = 0 ]; then
  cargo test --workspace --locked
  exit 0
fi

# --- stress mode ---------------------------------------------------------
# The hog's own bound: it stops by itself even if this script is killed.
HOG_SECONDS=${REGPROXY_STRESS_HOG_SECONDS:-2400}
logs=target/stress
mkdir -p "$logs"
hog=""
stop_hog() {
  if [ -n "$hog" ]; then
    kill "$hog" 2>/dev/null || true
    wait "$hog" 2>/dev/null || true
    hog=""
  fi
}
trap stop_hog EXIT

summary=()
failures=0
# run NAME CONDITION COMMAND...: one whole suite, timed, its output in a log.
run() {
  local name=$1 condition=$2
  shift 2
  local log="$logs/$name.log" start end status passed failed
  echo "== $name: $condition (log: $log)"
  start=$(date +%s)
  if "$@" >"$log" 2>&1; then status=PASS; else status=FAIL; failures=$((failures + 1)); fi
  end=$(date +%s)
  # Summed over every test binary's "test result: ok. N passed; M failed".
  passed=$(grep -o '[0-9]* passed;' "$log" | awk '{s += $1} END {print s + 0}')
  failed=$(grep -o '[0-9]* failed;' "$log" | awk '{s += $1} END {print s + 0}')
  local line
  line=$(printf '%-8s %-34s %5ss  %4s passed  %3s failed  %s' \
    "$name" "$condition" "$((end - start))" "$passed" "$failed" "$status")
  echo "$line"
  if [ "$status" = FAIL ]; then
    grep -E '^test .* FAILED$|panicked at' "$log" | head -20 || true
  fi
  summary+=("$line")
}

for i in 1 2; do
  run "pinned$i" "taskset -c 0 (one core)" \
    taskset -c 0 cargo test --workspace --locked --no-fail-fast
done
for i in 1 2; do
  stress-ng --cpu 2 --timeout "${HOG_SECONDS}s" --quiet >"$logs/hog$i.log" 2>&1 &
  hog=$!
  run "hog$i" "stress-ng --cpu 2 beside it" \
    cargo test --workspace --locked --no-fail-fast
  stop_hog
done

echo "== stress summary"
printf '%s\n' "${summary[@]}"
if [ "$failures" -gt 0 ]; then
  echo "$failures of ${#summary[@]} stress runs failed" >&2
  exit 1
fi
echo "all ${#summary[@]} stress runs passed"
