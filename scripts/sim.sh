#!/usr/bin/env bash
# Many seeds of the deterministic region simulation (CI runs a fixed handful).
#   scripts/sim.sh [FIRST_SEED] [COUNT] [CHAOS_SECONDS]
# defaults: 1000 50 30. Prints one report line per seed; a failing seed is printed with the
# command that replays it exactly.
set -euo pipefail
cd "$(dirname "$0")/.."
first="${1:-1000}"
count="${2:-50}"
secs="${3:-30}"
cargo test -p meridian-tests --test simulation --no-run
status=0
for ((seed = first; seed < first + count; seed++)); do
  if ! out=$(MERIDIAN_SIM_SEED=$seed MERIDIAN_SIM_SECS=$secs \
      cargo test -q -p meridian-tests --test simulation -- --exact replay --nocapture 2>&1); then
    echo "$out" | grep -E '^seed |^  ' || echo "$out" | tail -20
    echo "FAILED: MERIDIAN_SIM_SEED=$seed MERIDIAN_SIM_SECS=$secs cargo test -p meridian-tests --test simulation -- --exact replay --nocapture"
    status=1
  else
    echo "$out" | grep -E '^seed ' || true
  fi
done
exit $status
