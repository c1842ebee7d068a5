# Starts a throw-away PostgreSQL server for the ledger tests and exports
# NEUROSHARD_TEST_POSTGRES_URL. Source it. Installs PostgreSQL from Debian when absent.
# The server listens on 127.0.0.1 only and is stopped by scripts/test.sh when the tests end.

_ns_pg() {
    local bin
    bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
        echo "postgres: installing the Debian package" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null || {
            apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null
        } || return 1
        bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    fi
    id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql postgres || return 1
    NS_PGDATA=$(mktemp -d /tmp/ns-pg.XXXXXX)
    chown postgres "$NS_PGDATA"
    local port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    local as_pg="runuser -u postgres --"
    [ "$(id -u)" = "$(id -u postgres)" ] && as_pg=""
    $as_pg "$bin/initdb" -D "$NS_PGDATA/data" -A trust -U postgres >/dev/null || return 1
    $as_pg "$bin/pg_ctl" -D "$NS_PGDATA/data" -l "$NS_PGDATA/log" -w \
        -o "-p $port -k $NS_PGDATA -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null || {
        cat "$NS_PGDATA/log" >&2
        return 1
    }
    $as_pg "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres neuroshard_test || return 1
    NS_PG_STOP="$as_pg $bin/pg_ctl -D $NS_PGDATA/data -m fast stop"
    export NEUROSHARD_TEST_POSTGRES_URL="postgres://postgres@127.0.0.1:$port/neuroshard_test"
    export NS_PG_STOP NS_PGDATA
    echo "postgres: test server on 127.0.0.1:$port" >&2
}
_ns_pg
