#!/usr/bin/env bash
# The crash loop, longer than the suite's 30 runs: regproxy killed (kill -9)
# at a random moment of each run, restarted on the same cache dir, and every
# invariant checked after each restart (proxy/tests/crash.rs says which).
#
#   scripts/crashloop.sh [RUNS]      default 300
#
# The seed comes from the clock and is printed; replay a failure with
# REGPROXY_CRASH_SEED=<seed> scripts/crashloop.sh <RUNS>. Prints one line per
# run and a summary (runs, seed, time, counts); exits non-zero on the first
# broken invariant. The full output (with the killed proxy's log on a
# failure) goes to target/crashloop.log. Needs what the test suite needs
# (docker-registry; scripts/deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

runs="${1:-300}"
case "$runs" in
  '' | *[!0-9]*)
    echo "usage: scripts/crashloop.sh [RUNS]" >&2
    exit 2
    ;;
esac

log=target/crashloop.log
mkdir -p target
start=$(date +%s)
status=0
REGPROXY_CRASH_RUNS="$runs" cargo test -p regproxy --test crash --locked -- kill_9 --nocapture \
  >"$log" 2>&1 || status=$?
# The proxy's own log lines (JSON) are only in a failure's message: leave
# them in the log file.
grep -v '^{"' "$log" | sed -n -e '/panicked at/{N;p;d}' -e '/^crash loop\|^run [0-9]*:\|^test result/p'
echo "crashloop: $runs runs, $(($(date +%s) - start)) s with the build, exit $status (log: $log)"
exit "$status"
