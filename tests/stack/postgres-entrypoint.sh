#!/bin/bash
# Entrypoint of the locally built test Postgres image. It honours the same
# variables as the official postgres image (and Immich's ghcr.io/immich-app/postgres):
# POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB, POSTGRES_INITDB_ARGS, and runs
# /docker-entrypoint-initdb.d/*.sql once, on an empty data directory.
set -euo pipefail
PGDATA=${PGDATA:-/var/lib/postgresql/data}
export PGDATA
mkdir -p "$PGDATA" /var/run/postgresql
chown postgres:postgres "$PGDATA" /var/run/postgresql
chmod 700 "$PGDATA"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    pwfile=$(mktemp)
    printf '%s\n' "${POSTGRES_PASSWORD:-postgres}" > "$pwfile"
    chown postgres "$pwfile"
    # shellcheck disable=SC2086
    runuser -u postgres -- initdb --username="${POSTGRES_USER:-postgres}" --pwfile="$pwfile" \
        --auth-local=trust --auth-host=scram-sha-256 ${POSTGRES_INITDB_ARGS:-} >/dev/null
    rm -f "$pwfile"
    echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    runuser -u postgres -- pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
    db=${POSTGRES_DB:-${POSTGRES_USER:-postgres}}
    if [ "$db" != postgres ]; then
        runuser -u postgres -- psql -v ON_ERROR_STOP=1 --username="${POSTGRES_USER:-postgres}" \
            --dbname=postgres -c "CREATE DATABASE \"$db\"" >/dev/null
    fi
    for f in /docker-entrypoint-initdb.d/*.sql; do
        [ -e "$f" ] || continue
        echo "running $f"
        runuser -u postgres -- psql -v ON_ERROR_STOP=1 --username="${POSTGRES_USER:-postgres}" \
            --dbname="$db" -f "$f" >/dev/null
    done
    runuser -u postgres -- pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
    echo "database initialised"
fi
# A compose file's `command: postgres -c ...` (Immich's own for pgvecto.rs) names the server
# first, as the official image allows: the options follow it.
if [ "${1:-}" = postgres ]; then shift; fi
# setpriv execs (runuser would stay as PID 1 and not pass SIGINT on to postgres)
exec setpriv --reuid=postgres --regid=postgres --init-groups postgres -D "$PGDATA" "$@"
