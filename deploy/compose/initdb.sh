#!/bin/bash
# Runs once when the Postgres container initialises its data directory:
# the two login roles, the auth functions (guc flavour: the official image
# has no pg_session_jwt) and the sample RLS table.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username postgres --dbname "$POSTGRES_DB" \
    -v auth_pw="$AUTHENTICATED_PASSWORD" -v anon_pw="$ANONYMOUS_PASSWORD" <<'SQL'
CREATE ROLE authenticated LOGIN PASSWORD :'auth_pw';
CREATE ROLE anonymous LOGIN PASSWORD :'anon_pw';
SQL
psql -v ON_ERROR_STOP=1 --username postgres --dbname "$POSTGRES_DB" -f /rlsproxy-sql/auth_guc.sql
psql -v ON_ERROR_STOP=1 --username postgres --dbname "$POSTGRES_DB" -f /rlsproxy-sql/demo.sql
