#!/usr/bin/env bash
# Side-by-side benchmark, same machine, same server, same run, interleaved
# per round:
#   direct      Postgres as the superuser, no row-level security: the limit;
#   direct-rls  Postgres as a role with the session claims preset, so every
#               query runs the same RLS policy rlsproxy's sessions run;
#   rlsproxy    a JWT verified on every connection, claims set per session;
#   pgbouncer   session mode, the same role and policy as direct-rls.
# Prints median TPS and ratios per scenario, then memory per idle client.
# Loopback only; every run bounded.
#
#   scripts/bench.sh                 # 3 rounds of 4 s per run
#   ROUNDS=5 SECONDS_PER_RUN=15 scripts/bench.sh
#   IDLE_CLIENTS=1000 scripts/bench.sh
#   ROUNDS=0 scripts/bench.sh        # memory per idle client only
#   BENCH_HOLD=1 scripts/bench.sh    # set up, print the pgbench commands, wait
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

ROUNDS=${ROUNDS:-3}
T=${SECONDS_PER_RUN:-4}
SCALE=${SCALE:-10}
POOL=${POOL:-8}
IDLE_CLIENTS=${IDLE_CLIENTS:-1000}
WARM_CLIENTS=100

# Idle-client memory needs two descriptors per client in each proxy.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

ensure_postgres
if ! command -v pgbouncer >/dev/null 2>&1; then
    echo "installing pgbouncer from Debian's packages" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends pgbouncer >/dev/null
fi
cargo build --release --quiet --bin rlsproxy --example idle_clients
BIN=$PWD/target/release/rlsproxy
IDLE=$PWD/target/release/examples/idle_clients

WORK=$(mktemp -d /tmp/rlsproxy-bench.XXXXXX)
chmod 755 "$WORK"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    # PgBouncer runs under runuser: its own pid is in its pidfile.
    [ -f "$WORK/bouncer/pgbouncer.pid" ] && kill "$(cat "$WORK/bouncer/pgbouncer.pid")" 2>/dev/null
    wait 2>/dev/null || true
    stop_pg "$WORK/pg"
    rm -rf "$WORK"
}
trap cleanup EXIT

PW=bench-password
PG_PORT=$(free_port)
start_pg "$WORK/pg" "$PG_PORT" "$PW" \
    "max_connections = $((IDLE_CLIENTS + 200))" "shared_buffers = '256MB'" "synchronous_commit = off"
export PGHOST=127.0.0.1 PGPORT=$PG_PORT PGUSER=postgres PGPASSWORD=$PW PGDATABASE=postgres
pgbench -i -q -s "$SCALE" >/dev/null 2>&1
psql -q -v ON_ERROR_STOP=1 -f sql/pg_session_jwt_standin.sql >/dev/null
psql -q -v ON_ERROR_STOP=1 <<SQL >/dev/null
CREATE ROLE authenticated LOGIN PASSWORD '$PW';
GRANT SELECT, UPDATE ON pgbench_accounts, pgbench_branches, pgbench_tellers TO authenticated;
GRANT INSERT ON pgbench_history TO authenticated;
ALTER TABLE pgbench_accounts ENABLE ROW LEVEL SECURITY;
CREATE POLICY signed_in ON pgbench_accounts FOR ALL TO authenticated
    USING (auth.user_id() IS NOT NULL) WITH CHECK (auth.user_id() IS NOT NULL);
-- direct-rls and pgbouncer: a login whose sessions start as authenticated
-- with fixed claims, so the server runs the same policy without a proxy.
CREATE ROLE bench_rls LOGIN PASSWORD '$PW' IN ROLE authenticated;
ALTER ROLE bench_rls SET role = 'authenticated';
ALTER ROLE bench_rls SET pg_session_jwt.jwk = 'standin';
ALTER ROLE bench_rls SET pg_session_jwt.session = '{"sub":"bench-user"}';
SQL

# Development issuer and the token every rlsproxy connection presents.
ISSUER_PORT=$(free_port)
ISSUER=http://127.0.0.1:$ISSUER_PORT
"$BIN" dev-issuer --key-file "$WORK/issuer.key" --issuer "$ISSUER" --listen "127.0.0.1:$ISSUER_PORT" \
    2>"$WORK/issuer.log" &
PIDS+=($!)
wait_port "$ISSUER_PORT"
TOKEN=$("$BIN" token --key-file "$WORK/issuer.key" --issuer "$ISSUER" --sub bench-user --ttl 2h)

PROXY_PORT=$(free_port)
cat >"$WORK/proxy.toml" <<TOML
[listen]
addr = "127.0.0.1:$PROXY_PORT"
max_clients = $((IDLE_CLIENTS + 200))
[upstream]
host = "127.0.0.1"
port = $PG_PORT
[roles.authenticated]
password = "$PW"
[[issuers]]
issuer = "$ISSUER"
jwks_url = "$ISSUER/.well-known/jwks.json"
audience = "rlsproxy-demo"
[pool]
max_per_role = $POOL
[admin]
addr = "127.0.0.1:$(free_port)"
TOML
RUST_LOG=warn "$BIN" --config "$WORK/proxy.toml" 2>"$WORK/proxy.log" &
PROXY_PID=$!
PIDS+=($PROXY_PID)
wait_port "$PROXY_PORT"

# The same proxy with claims in `guc` mode (a set_config instead of
# auth.jwt_session_init): separates the proxy's own connect cost from the
# plpgsql stand-in's, which the real extension does not have.
GUC_PORT=$(free_port)
sed -e "s/^addr = \"127.0.0.1:$PROXY_PORT\"/addr = \"127.0.0.1:$GUC_PORT\"/" \
    -e "/^\[admin\]/,\$d" "$WORK/proxy.toml" >"$WORK/proxy-guc.toml"
printf '[claims]\nmode = "guc"\n[admin]\naddr = "127.0.0.1:%s"\n' "$(free_port)" >>"$WORK/proxy-guc.toml"
RUST_LOG=warn "$BIN" --config "$WORK/proxy-guc.toml" 2>"$WORK/proxy-guc.log" &
GUC_PID=$!
PIDS+=($GUC_PID)
wait_port "$GUC_PORT"

BOUNCER_PORT=$(free_port)
mkdir -p "$WORK/bouncer"
cat >"$WORK/pgbouncer.ini" <<INI
[databases]
postgres = host=127.0.0.1 port=$PG_PORT dbname=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = trust
auth_file = $WORK/userlist.txt
pool_mode = session
default_pool_size = $POOL
max_client_conn = $((IDLE_CLIENTS + 200))
logfile = $WORK/bouncer/pgbouncer.log
pidfile = $WORK/bouncer/pgbouncer.pid
INI
printf '"%s" "%s"\n' postgres "$PW" bench_rls "$PW" >"$WORK/userlist.txt"
chmod 644 "$WORK/pgbouncer.ini" "$WORK/userlist.txt"
[ "$(id -u)" -eq 0 ] && chown postgres "$WORK/bouncer"
# runuser's PAM session resets the descriptor limit: raise it again inside.
start_bouncer() {
    as_pg bash -c 'ulimit -n "$(ulimit -Hn)"; exec pgbouncer "$1"' _ "$WORK/pgbouncer.ini" >/dev/null 2>&1 &
}
start_bouncer
PIDS+=($!)
wait_port "$BOUNCER_PORT" || { cat "$WORK/bouncer/pgbouncer.log" >&2; exit 1; }

# target → connection flags and password
declare -A PORT=([direct]=$PG_PORT [direct-rls]=$PG_PORT [rlsproxy]=$PROXY_PORT [pgbouncer]=$BOUNCER_PORT [rlsproxy-guc]=$GUC_PORT)
declare -A USER=([direct]=postgres [direct-rls]=bench_rls [rlsproxy]=authenticated [pgbouncer]=bench_rls [rlsproxy-guc]=authenticated)
declare -A PASS=([direct]=$PW [direct-rls]=$PW [rlsproxy]=$TOKEN [pgbouncer]=$PW [rlsproxy-guc]=$TOKEN)
TARGETS=(direct direct-rls rlsproxy pgbouncer)
# Connect-bound: also run with claims in guc mode (see above).
CONNECT_SCENARIO="-C -S -c 8 -j 2"
SCENARIOS=(
    "-S -c 1"
    "-S -c 8 -j 2"
    "-S -M prepared -c 8 -j 2"
    "-C -S -c 8 -j 2"
    "-c 8 -j 2"
)

run_one() {
    local target=$1 flags=$2 out
    # shellcheck disable=SC2086
    out=$(PGPASSWORD=${PASS[$target]} timeout $((T + 30)) pgbench -n $flags -T "$T" \
        -h 127.0.0.1 -p "${PORT[$target]}" -U "${USER[$target]}" postgres 2>&1) || {
        echo "pgbench failed for $target ($flags):" >&2
        echo "$out" >&2
        echo 0
        return
    }
    sed -nE 's/^tps = ([0-9.]+) .*/\1/p' <<<"$out" | head -n 1
}

if [ -n "${BENCH_HOLD:-}" ]; then
    # Keep the three targets up for manual runs (profiling); Ctrl-C cleans up.
    for target in "${TARGETS[@]}" rlsproxy-guc; do
        echo "$target: PGPASSWORD='${PASS[$target]}' pgbench -n -h 127.0.0.1 -p ${PORT[$target]} -U ${USER[$target]} postgres" >&2
    done
    echo "rlsproxy pid $PROXY_PID" >&2
    sleep infinity &
    wait $!
fi

declare -A RESULTS
echo "rlsproxy bench: $ROUNDS rounds x $T s, scale $SCALE, pool $POOL, $(nproc) cores" >&2
for round in $(seq 1 "$ROUNDS"); do
    for scenario in "${SCENARIOS[@]}"; do
        targets=("${TARGETS[@]}")
        [ "$scenario" = "$CONNECT_SCENARIO" ] && targets+=(rlsproxy-guc)
        for target in "${targets[@]}"; do
            tps=$(run_one "$target" "$scenario")
            RESULTS["$scenario|$target"]+="$tps "
            printf 'round %d  %-26s %-11s %10.1f tps\n' "$round" "$scenario" "$target" "$tps" >&2
        done
    done
done

median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

[ "$ROUNDS" -gt 0 ] && {
echo
echo "| scenario | direct | direct-rls | rlsproxy | PgBouncer | rlsproxy / direct | rlsproxy / direct-rls | PgBouncer / direct-rls | rlsproxy / PgBouncer |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
# row LABEL SCENARIO PROXY: one table line, PROXY's TPS against the others.
row() {
    local label=$1 scenario=$2 proxy=$3 d p r b
    d=$(median <<<"${RESULTS["$scenario|direct"]}")
    p=$(median <<<"${RESULTS["$scenario|direct-rls"]}")
    r=$(median <<<"${RESULTS["$scenario|$proxy"]}")
    b=$(median <<<"${RESULTS["$scenario|pgbouncer"]}")
    awk -v s="$label" -v d="$d" -v p="$p" -v r="$r" -v b="$b" '
        function ratio(x, y) { return y > 0 ? x / y : 0 }
        BEGIN {
            printf "| %s | %.0f | %.0f | %.0f | %.0f | %.2fx | %.2fx | %.2fx | %.2fx |\n",
                s, d, p, r, b, ratio(r, d), ratio(r, p), ratio(b, p), ratio(r, b)
        }'
}
for scenario in "${SCENARIOS[@]}"; do
    row "\`pgbench $scenario\`" "$scenario" rlsproxy
done
row "\`pgbench $CONNECT_SCENARIO\`, claims in guc mode" "$CONNECT_SCENARIO" rlsproxy-guc
}

rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
idle_memory() {
    local name=$1 pid=$2 port=$3 user=$4 pass=$5 before after warm_pid warm_in
    # A first batch of clients pays for what is set up once (runtime,
    # allocator arenas, pool maps); the figure is what each further one adds.
    # It holds its clients until its stdin (a fifo kept open here) closes.
    mkfifo "$WORK/warm-$name.in"
    "$IDLE" 127.0.0.1 "$port" "$user" "$pass" postgres "$WARM_CLIENTS" \
        <"$WORK/warm-$name.in" >"$WORK/warm-$name.out" &
    warm_pid=$!
    exec {warm_in}>"$WORK/warm-$name.in"
    for _ in $(seq 1 120); do grep -q ready "$WORK/warm-$name.out" && break; sleep 0.5; done
    sleep 1
    before=$(rss_kib "$pid")
    coproc HOLD { "$IDLE" 127.0.0.1 "$port" "$user" "$pass" postgres "$IDLE_CLIENTS"; }
    local ready=""
    read -t 180 -r ready <&"${HOLD[0]}" || ready="timed out"
    sleep 1
    after=$(rss_kib "$pid")
    # Closing the holder's stdin lets it exit and drop its connections.
    [ -n "${HOLD[1]:-}" ] && eval "exec ${HOLD[1]}>&-"
    wait "${HOLD_PID:-}" 2>/dev/null || true
    exec {warm_in}>&-
    wait "$warm_pid" 2>/dev/null || true
    awk -v n="$name" -v b="$before" -v a="$after" -v c="$IDLE_CLIENTS" -v r="$ready" 'BEGIN {
        printf "| %s | %s | %d KiB | %d KiB | %.1f KiB |\n", n, r, b, a, (a-b)/c
    }'
}

echo
echo "| memory, $IDLE_CLIENTS idle clients (after $WARM_CLIENTS) | clients held | RSS before | RSS after | per client |"
echo "|---|---|---:|---:|---:|"
# Session pooling gives every client its own upstream connection, so the
# pools grow to the client count for this part.
sed -i "s/^max_per_role = .*/max_per_role = $((IDLE_CLIENTS + 110))/" "$WORK/proxy.toml"
kill -HUP "$PROXY_PID"
sleep 1
idle_memory rlsproxy "$PROXY_PID" "$PROXY_PORT" authenticated "$TOKEN"
# Free the proxies' pooled server connections for PgBouncer's turn.
kill "$PROXY_PID" "$GUC_PID"
wait "$PROXY_PID" "$GUC_PID" 2>/dev/null || true
# PgBouncer applies a new pool size only to new pools: restart it.
kill "$(cat "$WORK/bouncer/pgbouncer.pid")"
sleep 1
sed -i "s/^default_pool_size = .*/default_pool_size = $((IDLE_CLIENTS + 110))/" "$WORK/pgbouncer.ini"
start_bouncer
PIDS+=($!)
wait_port "$BOUNCER_PORT"
BOUNCER_PID=$(cat "$WORK/bouncer/pgbouncer.pid")
idle_memory pgbouncer "$BOUNCER_PID" "$BOUNCER_PORT" bench_rls "$PW"

echo
echo "PostgreSQL $(psql -At -c 'SHOW server_version'), $(pgbouncer --version 2>&1 | head -n 1), $(nproc) cores, $(free -g | awk '/^Mem/ {print $2}') GiB"
