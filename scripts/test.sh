#!/usr/bin/env bash
# The whole test suite: unit, property and end-to-end tests (real node processes on loopback).
# Installs missing system packages first, so it runs on a fresh machine and in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
# The end-to-end tests start the `meridian` binary, so it is built before they run.
cargo build -p meridian-tools --bin meridian
cargo test --workspace -- --test-threads=2
