#!/usr/bin/env bash
# Runs every fuzz target for a bounded time from its committed seeds, after
# replaying the inputs that once crashed it (regressions/<target>/). A crash
# fails the run and leaves the input in tests/fuzz/artifacts/<target>/; keep
# it as a regression by moving it to regressions/<target>/ once fixed.
#   FUZZ_SECONDS=60 bash tests/fuzz/run.sh [target ...]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../.."
seconds=${FUZZ_SECONDS:-60}
# cargo fuzz needs nightly-only flags; the stable toolchain takes them so.
export RUSTC_BOOTSTRAP=1
# --dev: unoptimised but with AddressSanitizer and coverage, which builds in
# less time; the targets are parsers, fast enough either way.
fuzz=(cargo fuzz)
mapfile -t targets < <(if [ $# -gt 0 ]; then printf '%s\n' "$@"; else "${fuzz[@]}" list --fuzz-dir tests/fuzz; fi)
"${fuzz[@]}" build --fuzz-dir tests/fuzz --dev
work=$(mktemp -d /tmp/seamless-fuzz.XXXXXX)
trap 'rm -rf "$work"' EXIT
passed=0
failed=0
for target in "${targets[@]}"; do
  seeds=tests/fuzz/seeds/$target
  regressions=tests/fuzz/regressions/$target
  if [ -d "$regressions" ] && [ -n "$(ls -A "$regressions")" ]; then
    echo "fuzz: $target: replaying $(ls "$regressions" | wc -l) regression inputs"
    if "${fuzz[@]}" run --fuzz-dir tests/fuzz --dev "$target" "$regressions"/* -- -runs=1 >"$work/$target.replay.log" 2>&1; then
      passed=$((passed + 1))
    else
      tail -40 "$work/$target.replay.log"
      echo "fuzz: $target: a regression input fails again"
      failed=$((failed + 1))
    fi
  fi
  mkdir -p "$work/$target"
  echo "fuzz: $target: ${seconds}s from $(ls "$seeds" | wc -l) seeds"
  # -rss_limit_mb: the targets must stay small whatever the input says
  # (sizes in archives are checked before anything is allocated).
  if "${fuzz[@]}" run --fuzz-dir tests/fuzz --dev "$target" "$work/$target" "$seeds" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=30 -print_final_stats=1 \
      >"$work/$target.log" 2>&1; then
    grep -E '^stat::number_of_executed_units|^Done [0-9]+ runs' "$work/$target.log" | sed "s/^/fuzz: $target: /" || true
    passed=$((passed + 1))
  else
    tail -60 "$work/$target.log"
    echo "fuzz: $target: FAILED (input kept under tests/fuzz/artifacts/$target/)"
    failed=$((failed + 1))
  fi
done
echo "fuzz: $passed passed, $failed failed"
((failed == 0))
