#!/usr/bin/env bash
# The benchmark (issue 7): outbound throughput and latency against Postfix's smtp-sink,
# inbound throughput from Dovecot, peak RSS; prints a table. Installs what it needs.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

ensure_rust
ensure_rabbitmq
ensure_postgres
ensure_test_python
ensure_dovecot
[ -x /usr/sbin/smtp-sink ] || apt_install postfix
export MAILBRIDGE_TEST_PG="${MAILBRIDGE_TEST_PG:-$(pg_server_url)}"
cargo bench --locked --bench throughput
