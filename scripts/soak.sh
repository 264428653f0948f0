#!/usr/bin/env bash
# Load and soak: SOAK_CLIENTS (default 200) clients connect, query and leave
# in a loop for SOAK_SECONDS (default 120; CI uses ~20) with valid and
# invalid tokens mixed, while the JWKS rotates keys and fails half the time.
# Fails on any valid-token error, any invalid token let in, RSS growth or
# more upstream connections than the pool allows. SOAK_PROFILE=release to
# build optimised.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_postgres
export SOAK_SECONDS="${SOAK_SECONDS:-120}" SOAK_CLIENTS="${SOAK_CLIENTS:-200}"
profile=()
[ "${SOAK_PROFILE:-}" = release ] && profile=(--release)
cargo test "${profile[@]}" --test soak -- --ignored --nocapture
