#!/usr/bin/env bash
# Long fault-injection runs with the queue checker (the CI suite runs each nemesis for 12 s).
#   scripts/chaos.sh [SECONDS] [NEMESIS...]
# SECONDS per nemesis (default 600); NEMESIS names as in tests/tests/chaos.rs (kill_one,
# kill_leader, kill_all, pause_leader, partition_minority, isolate_leader, flapping_partition,
# clock_jump, disk_full, lossy_network); default all. Prints one table row per nemesis.
# A 30-minute soak of one nemesis: scripts/chaos.sh 1800 kill_leader
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-600}"
shift || true
cargo build -p meridian-tools --bin meridian
filter=()
if [ "$#" -gt 0 ]; then filter=("$@"); fi
status=0
for t in "${filter[@]:-}"; do
  MERIDIAN_CHAOS_SECS="$secs" cargo test -p meridian-tests --test chaos -- --exact ${t:+$t} \
    --nocapture --test-threads=1 2>&1 | grep -E '^\| |^test |panicked' || status=1
done
exit $status
