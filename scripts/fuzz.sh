#!/usr/bin/env bash
# Fuzzes the CMQ HTTP parsers (form/array parser, signature canonicaliser, deadLetterPolicy JSON)
# with cargo-fuzz/libFuzzer for a bounded time per target. Not part of CI.
# Usage: scripts/fuzz.sh [seconds-per-target, default 60]
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
bash scripts/install-deps.sh
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
# cargo-fuzz needs nightly flags (-Zsanitizer); the stable toolchain allows them this way.
export RUSTC_BOOTSTRAP=1
for target in form_parser signature dead_letter_policy; do
  echo "== $target ($secs s)"
  cargo fuzz run --fuzz-dir fuzz "$target" -- -max_total_time="$secs" -rss_limit_mb=2048
done
