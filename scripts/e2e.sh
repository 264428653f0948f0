#!/usr/bin/env bash
# End to end with real clients: a throwaway Postgres (pg_session_jwt
# stand-in), the development issuer, the proxy, then psql and pgbench
# through it with real tokens. Exits non-zero if any check fails.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

ensure_postgres
cargo build --quiet
BIN=$PWD/target/debug/rlsproxy

WORK=$(mktemp -d /tmp/rlsproxy-e2e.XXXXXX)
chmod 755 "$WORK"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    stop_pg "$WORK/pg"
    rm -rf "$WORK"
}
trap cleanup EXIT

SUPER_PW=e2e-super
AUTH_PW=e2e-authenticated
ANON_PW=e2e-anonymous
PG_PORT=$(free_port)
start_pg "$WORK/pg" "$PG_PORT" "$SUPER_PW"
export PGHOST=127.0.0.1 PGPORT=$PG_PORT PGUSER=postgres PGPASSWORD=$SUPER_PW PGDATABASE=postgres
psql -q -v ON_ERROR_STOP=1 <<SQL >/dev/null
CREATE ROLE authenticated LOGIN PASSWORD '$AUTH_PW';
CREATE ROLE anonymous LOGIN PASSWORD '$ANON_PW';
SQL
psql -q -v ON_ERROR_STOP=1 -f sql/pg_session_jwt_standin.sql >/dev/null
psql -q -v ON_ERROR_STOP=1 -f sql/demo.sql >/dev/null
pgbench -i -q -s 1 >/dev/null 2>&1
psql -q -v ON_ERROR_STOP=1 <<'SQL' >/dev/null
GRANT SELECT ON pgbench_accounts, pgbench_branches, pgbench_tellers TO authenticated;
ALTER TABLE pgbench_accounts ENABLE ROW LEVEL SECURITY;
CREATE POLICY signed_in ON pgbench_accounts FOR SELECT TO authenticated
    USING (auth.user_id() IS NOT NULL);
SQL

ISSUER_PORT=$(free_port)
ISSUER=http://127.0.0.1:$ISSUER_PORT
KEY=$WORK/issuer.key
"$BIN" dev-issuer --key-file "$KEY" --issuer "$ISSUER" --listen "127.0.0.1:$ISSUER_PORT" \
    2>"$WORK/issuer.log" &
PIDS+=($!)
wait_port "$ISSUER_PORT"

PROXY_PORT=$(free_port)
cat >"$WORK/proxy.toml" <<TOML
[listen]
addr = "127.0.0.1:$PROXY_PORT"
[upstream]
host = "127.0.0.1"
port = $PG_PORT
[roles.authenticated]
password = "\${E2E_AUTH_PW}"
[roles.anonymous]
password = "$ANON_PW"
requires_token = false
[[issuers]]
issuer = "$ISSUER"
jwks_url = "$ISSUER/.well-known/jwks.json"
audience = "rlsproxy-demo"
[pool]
max_per_role = 8
[admin]
addr = "127.0.0.1:$(free_port)"
TOML
E2E_AUTH_PW=$AUTH_PW "$BIN" check --config "$WORK/proxy.toml" >/dev/null
E2E_AUTH_PW=$AUTH_PW "$BIN" --config "$WORK/proxy.toml" 2>"$WORK/proxy.log" &
PIDS+=($!)
wait_port "$PROXY_PORT"

passed=0
failed=0
check() {
    local name=$1 expected=$2 got=$3
    if [ "$got" = "$expected" ]; then
        passed=$((passed + 1))
        echo "ok   $name"
    else
        failed=$((failed + 1))
        echo "FAIL $name: expected [$expected], got [$got]"
    fi
}

token() { "$BIN" token --key-file "$KEY" --issuer "$ISSUER" --sub "$1"; }
via_proxy() {
    local user=$1 password=$2
    shift 2
    PGPASSWORD=$password psql "host=127.0.0.1 port=$PROXY_PORT user=$user dbname=postgres" \
        -X -A -t -v ON_ERROR_STOP=1 "$@"
}

ALICE=$(token alice)
BOB=$(token bob)
check "alice sees her rows" "alice|authenticated|2" \
    "$(via_proxy authenticated "$ALICE" -c 'SELECT auth.user_id(), current_user, count(*) FROM todos')"
check "bob sees his rows" "bob|1" \
    "$(via_proxy authenticated "$BOB" -c 'SELECT auth.user_id(), count(*) FROM todos')"
check "psql URL form" "alice" \
    "$(psql -X -A -t "postgresql://authenticated:$ALICE@127.0.0.1:$PROXY_PORT/postgres" -c 'SELECT DISTINCT owner FROM todos')"
check "anonymous without a password" "anonymous|1" \
    "$(PGPASSWORD= psql "host=127.0.0.1 port=$PROXY_PORT user=anonymous dbname=postgres" -X -A -t -c 'SELECT current_user, count(*) FROM todos')"
# Bob's claims under Alice's signature.
FORGED="$(cut -d. -f1,2 <<<"$BOB").$(cut -d. -f3 <<<"$ALICE")"
refusal=$(via_proxy authenticated "$FORGED" -c 'SELECT 1' 2>&1 || true)
check "tampered token refused" "yes" "$(grep -q 'token signature is invalid' <<<"$refusal" && echo yes || echo "$refusal")"

if PGPASSWORD=$ALICE pgbench -n -S -T 5 -c 4 -j 2 -h 127.0.0.1 -p "$PROXY_PORT" -U authenticated postgres \
    >"$WORK/pgbench.log" 2>&1; then
    passed=$((passed + 1))
    echo "ok   pgbench -S through the proxy: $(grep -E '^tps' "$WORK/pgbench.log" | head -n 1)"
else
    failed=$((failed + 1))
    echo "FAIL pgbench through the proxy"
    cat "$WORK/pgbench.log"
fi

if grep -q "$ALICE" "$WORK/proxy.log"; then
    failed=$((failed + 1))
    echo "FAIL a token appears in the proxy log"
fi

echo "e2e: $passed passed, $failed failed"
[ "$failed" -eq 0 ] || { echo "--- proxy log"; tail -n 50 "$WORK/proxy.log"; exit 1; }
