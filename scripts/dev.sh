#!/usr/bin/env bash
# One command from a fresh Debian 12 machine with a Rust toolchain to a running local region:
# installs missing system packages, builds the `meridian` CLI and runs `meridian dev`.
# Extra arguments go to `meridian dev` (see `meridian dev --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build -p meridian-tools --bin meridian
exec ./target/debug/meridian dev "$@"
