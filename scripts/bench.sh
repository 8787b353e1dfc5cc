#!/usr/bin/env bash
# The benchmark (issue 7): outbound throughput and latency against Postfix's smtp-sink,
# inbound throughput from Dovecot, peak RSS; prints a table. Installs what it needs.
# BENCH_MAILBOXES=100,1000,10000 (or BENCH_ONLY=mailboxes) adds the mailbox-scale run
# (issue 13): idle IMAP mailboxes on a hibernating Dovecot. Beside mailbridge's runs it runs the
# reference implementations of issue 15 (bench/reference: Node.js outbound and inbound, mbsync)
# and prints the ratios.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

ensure_rust
ensure_rabbitmq
ensure_postgres
ensure_test_python
ensure_dovecot
[ -x /usr/sbin/smtp-sink ] || apt_install postfix
export MAILBRIDGE_TEST_PG="${MAILBRIDGE_TEST_PG:-$(pg_server_url)}"
# Ten thousand IMAP sessions: a file each on both ends.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
ensure_node
ensure_mbsync
# The Node.js references (issue 15): their pinned packages, from each package-lock.json.
for reference in outbound inbound; do
    (cd "bench/reference/$reference" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
done
# The cost of issue 11's guarantees (claims, per-row isolation, byte budgets): the outbound run
# repeated with a release build of the last commit before them, in the same run
# (BENCH_BASELINE=0 skips it; the build is kept in target/baseline).
BASELINE_COMMIT=ded03b3
if [ "${BENCH_BASELINE:-1}" != 0 ] && [ -z "${BENCH_ONLY:-}" -o "${BENCH_ONLY:-}" = outbound ]; then
    base="$ROOT/target/baseline"
    if [ ! -x "$base/target/release/mailbridge" ]; then
        echo "==> building the baseline $BASELINE_COMMIT (before issue 11) in $base"
        rm -rf "$base/src" && mkdir -p "$base/src"
        git -C "$ROOT" archive "$BASELINE_COMMIT" | tar -x -C "$base/src"
        (cd "$base/src" && CARGO_TARGET_DIR="$base/target" cargo build --release --locked --bin mailbridge)
    fi
    export BENCH_BASELINE_BIN="$base/target/release/mailbridge"
    export BENCH_BASELINE_NAME="$BASELINE_COMMIT (the code before issue 11's guarantees)"
fi
cargo bench --locked --bench throughput
