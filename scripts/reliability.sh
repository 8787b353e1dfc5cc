#!/usr/bin/env bash
# Runs the fault and hostile-input tests (the same ones scripts/test.sh runs) and prints the
# table of docs/reliability.md from what they measured: for every fault, how many messages
# went through and where they ended. Set-up as scripts/test.sh.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

ensure_rust
trap stop_started_services EXIT
ensure_rabbitmq
ensure_postgres
ensure_test_python
ensure_dovecot
export MAILBRIDGE_TEST_PG="${MAILBRIDGE_TEST_PG:-$(pg_server_url)}"

out="$(mktemp)"
cargo test --locked --test reliability --test inbound_faults --test inbound --test promises \
    --test outbox_writer -- --nocapture 2>&1 | tee "$out" >&2
echo
echo "| fault or hostile input | messages | ended once where they should | duplicated | lost | stuck | what the service did |"
echo "|---|---|---|---|---|---|---|"
grep -a '^RELIABILITY|' "$out" | while IFS='|' read -r _ fault n once dup lost stuck note; do
    echo "| $fault | $n | $once | $dup | $lost | $stuck | $note |"
done
rm -f "$out"
