# Shell helpers shared by the scripts: PostgreSQL binaries, a throwaway
# cluster on loopback, free ports. Source it; it defines functions only.

# Installs the PostgreSQL server and client from Debian's packages when the
# server binaries are missing, then sets PG_BIN.
ensure_postgres() {
    PG_BIN=$(find_pg_bin || true)
    if [ -z "$PG_BIN" ]; then
        echo "PostgreSQL server binaries not found; installing them from Debian's packages" >&2
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql postgresql-client >/dev/null
        PG_BIN=$(find_pg_bin)
    fi
    export PG_BIN
    if [ "$(id -u)" -eq 0 ] && ! id postgres >/dev/null 2>&1; then
        useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres
    fi
}

# Prints the directory with initdb: PATH first, then the newest /usr/lib/postgresql/*/bin.
find_pg_bin() {
    if command -v initdb >/dev/null 2>&1; then
        dirname "$(command -v initdb)"
        return 0
    fi
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    [ -n "$dir" ] && [ -x "$dir/initdb" ] && echo "$dir"
}

# Runs a server program, as the postgres user when we are root (Postgres refuses root).
as_pg() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_port PORT [SECONDS]: waits until something accepts on 127.0.0.1:PORT.
wait_port() {
    local port=$1 deadline=$((SECONDS + ${2:-20}))
    until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "nothing listens on port $port after ${2:-20}s" >&2
            return 1
        fi
        sleep 0.1
    done
}

# start_pg DIR PORT PASSWORD [extra postgres settings...]: initdb + start a
# cluster listening on 127.0.0.1:PORT, superuser postgres with PASSWORD.
start_pg() {
    local dir=$1 port=$2 password=$3
    shift 3
    mkdir -p "$dir"
    printf '%s' "$password" >"$dir/pwfile"
    [ "$(id -u)" -eq 0 ] && chown -R postgres "$dir"
    (cd "$dir" && as_pg "$PG_BIN/initdb" -D "$dir/data" -U postgres --pwfile="$dir/pwfile" \
        -A scram-sha-256 --no-sync >"$dir/initdb.log" 2>&1) || { cat "$dir/initdb.log" >&2; return 1; }
    {
        echo "listen_addresses = '127.0.0.1'"
        echo "port = $port"
        echo "unix_socket_directories = '$dir'"
        echo "fsync = off"
        echo "max_connections = 300"
        for setting in "$@"; do echo "$setting"; done
    } >>"$dir/data/postgresql.conf"
    (cd "$dir" && as_pg "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start >/dev/null) \
        || { cat "$dir/server.log" >&2; return 1; }
}

stop_pg() {
    local dir=$1
    [ -d "$dir/data" ] && (cd "$dir" && as_pg "$PG_BIN/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1) || true
}
