#!/usr/bin/env bash
# The test command: installs the PostgreSQL server binaries when missing,
# then runs the Rust test suite (unit + integration against real Postgres
# clusters and a loopback JWKS server) and the psql/pgbench end-to-end script.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
ensure_postgres
cargo test --all-targets
bash scripts/e2e.sh
bash scripts/check-deploy.sh
