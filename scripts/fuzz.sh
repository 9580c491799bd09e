#!/usr/bin/env bash
# Coverage-guided fuzzing of regproxy's parsers and request router with
# cargo-fuzz (libFuzzer), on the stable toolchain: `--sanitizer none` needs
# no nightly flag. Installs cargo-fuzz when it is missing.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Runs each TARGET (default: all of fuzz/fuzz_targets/) for SECONDS (default
# 60), one at a time, growing fuzz/corpus/<target>/ and then minimizing it
# (`cargo fuzz cmin`, keeping one input per covered edge rather than per
# hit count), so that the checked-in corpus stays small. A crash
# (or timeout, or out-of-memory) is copied to fuzz/regressions/<target>/,
# which `cargo test -p regproxy --test fuzz_corpus` replays on stable; the
# script then exits 1. One line per target goes to stdout and to
# fuzz/artifacts/stats.tsv: seconds, executions, corpus files, findings.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

secs=${1:-60}
if ! [[ $secs =~ ^[0-9]+$ ]] || [ "$secs" -eq 0 ]; then
  echo "usage: scripts/fuzz.sh [SECONDS] [TARGET...]  (SECONDS > 0, default 60)" >&2
  exit 2
fi
[ $# -gt 0 ] && shift
if [ $# -gt 0 ]; then
  targets=("$@")
else
  targets=()
  for f in fuzz_targets/*.rs; do targets+=("$(basename "$f" .rs)"); done
fi
for t in "${targets[@]}"; do
  if [ ! -f "fuzz_targets/$t.rs" ]; then
    echo "no fuzz target '$t' (see fuzz/fuzz_targets/)" >&2
    exit 2
  fi
done

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked
fi

# The targets write scratch files under $TMPDIR; all of it goes at the end.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
export TMPDIR=$scratch

echo "building the fuzz targets (instrumented, release)" >&2
cargo fuzz build -s none >&2
mkdir -p artifacts
found=0
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "regressions/$t" "artifacts/$t"
  log="artifacts/$t.log"
  before=$(ls "artifacts/$t" | sort)
  status=0
  # New inputs go to the first dir; regressions/ seeds the run as well.
  cargo fuzz run -s none "$t" "corpus/$t" "regressions/$t" -- \
    -max_total_time="$secs" -print_final_stats=1 -timeout=30 \
    -rss_limit_mb=2048 -max_len=4096 >"$log" 2>&1 || status=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  ran=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
  new=$(comm -13 <(echo "$before") <(ls "artifacts/$t" | sort) | grep -E '^(crash|timeout|oom|leak|slow-unit)-' || true)
  for a in $new; do
    cp "artifacts/$t/$a" "regressions/$t/$a"
    echo "$t: FOUND $a, kept as fuzz/regressions/$t/$a" >&2
    found=1
  done
  if [ "$status" -ne 0 ] && [ -z "$new" ]; then
    echo "$t: the fuzzer failed without an artifact; see fuzz/$log" >&2
    tail -20 "$log" >&2
    found=1
  fi
  # Edges only (no hit counts): the same coverage in a third of the files.
  cargo fuzz cmin -s none "$t" "corpus/$t" -- -use_counters=0 >"artifacts/$t.cmin.log" 2>&1 ||
    echo "$t: corpus minimization failed; see fuzz/artifacts/$t.cmin.log" >&2
  files=$(ls "corpus/$t" | wc -l)
  line="$(date -u +%FT%TZ)	$t	${ran:-?}s	${execs:-?} execs	$files corpus files	$(echo $new | wc -w) findings"
  echo "$line" | tee -a artifacts/stats.tsv
done
exit $found
