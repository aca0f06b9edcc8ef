#!/usr/bin/env bash
# The deterministic region simulation beyond CI's fixed seeds (tests/tests/simulation.rs).
#   scripts/sim.sh seeds [FIRST_SEED] [COUNT] [SIMULATED_SECONDS]   (defaults 1000 50 30)
#       many seeds, every nemesis mixed in; one report line per seed
#   scripts/sim.sh soak [SIMULATED_SECONDS] [SEED]                  (defaults 600 1)
#       each nemesis alone for that long; prints a table row per nemesis
# A failing seed is printed with the command that replays it exactly.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-seeds}"
shift || true
cargo test -q -p meridian-tests --test simulation --no-run
status=0
one() { # seed secs nemeses
  local out
  if ! out=$(MERIDIAN_SIM_SEED=$1 MERIDIAN_SIM_SECS=$2 MERIDIAN_SIM_NEMESES=$3 \
      cargo test -q -p meridian-tests --test simulation -- --exact replay --nocapture 2>&1); then
    echo "$out" | grep -E '^seed |^  |^\| [a-z]' || echo "$out" | tail -20
    echo "FAILED: MERIDIAN_SIM_SEED=$1 MERIDIAN_SIM_SECS=$2 MERIDIAN_SIM_NEMESES=$3 cargo test -p meridian-tests --test simulation -- --exact replay --nocapture"
    status=1
  else
    echo "$out" | grep -E "${4:-^seed }" || true
  fi
}
all="crash-one,crash-leader,crash-all,isolate-node,isolate-leader,one-way-partition,message-loss,clock-jump,slow-disk"
case "$mode" in
  seeds)
    first="${1:-1000}"; count="${2:-50}"; secs="${3:-30}"
    for ((seed = first; seed < first + count; seed++)); do one "$seed" "$secs" "$all"; done
    ;;
  soak)
    secs="${1:-600}"; seed="${2:-1}"
    echo "| nemeses | seed | simulated s | sends acked | sends unknown | deliveries | deletes acked | lost | unexpected | dup after delete | corrupt | visibility | election safety | state machine safety | divergent | other |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    for n in ${all//,/ }; do one "$seed" "$secs" "$n" '^\| [a-z,-]+ \| [0-9]'; done
    ;;
  *) echo "usage: scripts/sim.sh seeds [FIRST] [COUNT] [SECS] | soak [SECS] [SEED]" >&2; exit 2 ;;
esac
exit $status
