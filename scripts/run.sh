#!/usr/bin/env bash
# Runs mailbridge with the shipped config (config/mailbridge.toml), after installing and
# starting RabbitMQ and PostgreSQL when they are missing or stopped. The service creates its
# database and applies the migrations itself. Extra arguments go to `mailbridge`.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

ensure_rust
ensure_rabbitmq
ensure_postgres
if [ -z "${DATABASE_URL:-}" ]; then
    server="$(pg_server_url)"
    case "$server" in
        postgres://*127.0.0.1*) ;;  # the shipped url (postgres://localhost/mailbridge) works as is
        *) export DATABASE_URL="$server/mailbridge"; log "PostgreSQL wants a password over TCP: using the local socket" ;;
    esac
fi

log "building mailbridge (release)"
cargo build --release --locked -q
exec target/release/mailbridge --config config/mailbridge.toml "${@:-run}"
