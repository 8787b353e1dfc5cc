#!/usr/bin/env bash
# Runs the whole test suite: formatting, clippy, unit and integration tests against the real
# RabbitMQ and PostgreSQL (installed and started here when missing or stopped), a real SMTP
# server (aiosmtpd, in a virtualenv under target/), the guide's Python client (pika) and
# Dovecot for IMAP/POP3, which the tests start on free ports themselves (and stop). Stops what it started.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

ensure_rust
trap stop_started_services EXIT
ensure_rabbitmq
ensure_postgres
ensure_test_python
ensure_dovecot
ensure_chromium
ensure_systemd_analyze
export MAILBRIDGE_TEST_PG="${MAILBRIDGE_TEST_PG:-$(pg_server_url)}"

# Logs, databases and vhosts left by an earlier run.
rm -rf /tmp/mbtest-* 2>/dev/null || true
for db in $(psql "$MAILBRIDGE_TEST_PG/postgres" -Atqc "SELECT datname FROM pg_database WHERE datname LIKE 'mb_test_%'"); do
    psql "$MAILBRIDGE_TEST_PG/postgres" -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null
done
for vhost in $($SUDO rabbitmqctl -q list_vhosts --silent name 2>/dev/null | grep '^mbtest-' || true); do
    $SUDO rabbitmqctl -q delete_vhost "$vhost" >/dev/null || true
done

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --locked --all-targets -q -- -D warnings
log "cargo test"
cargo test --locked --lib --bins --tests

# Secrets never reach the logs: no password the tests configure appears in any service log.
log "checking the service logs of the whole run for configured passwords"
leaks=$(grep -rl --include='service_*.log' -e 's3cret-pass' -e 'secret-imap-pw' -e 'mailbox-pw-123' -e 'configured-refresh-token' -e 'client-secret-1' -e 'standin-secret' /tmp/mbtest-* 2>/dev/null || true)
if [ -n "$leaks" ]; then
    echo "configured passwords found in: $leaks" >&2
    exit 1
fi
logs=$(find /tmp -maxdepth 2 -path '/tmp/mbtest-*' -name 'service_*.log' | wc -l)
echo "no configured password or OAuth2 token in $logs service logs"
