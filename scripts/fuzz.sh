#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo fuzz, libFuzzer) of the two entry points that take outside
# bytes: the `email.send` request (decode, validate, build) and a received email (parse,
# dedup key). Runs each target of fuzz/ for SECONDS (default 60) and copies every new input
# that crashes one into tests/fuzz-regressions/, where `cargo test --test fuzz` replays it
# through every property (rename it after what it exercises).
#
#   scripts/fuzz.sh [SECONDS]
#
# Installs cargo-fuzz from crates.io when missing. Runs on the stable toolchain: without a
# sanitizer cargo fuzz passes rustc only stable flags (the Rust code is memory-safe; what is
# looked for is panics). FUZZ_SANITIZER=address adds AddressSanitizer, whose -Z flag needs
# RUSTC_BOOTSTRAP=1 on stable (set here then). Builds as cargo fuzz does by default:
# optimized, with debug assertions and overflow checks, like the debug build the tests run.
# The first build takes long (every dependency, instrumented: about 15 minutes with one job);
# later ones take seconds. Exits 1 when it saved a new crash.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SECS="${1:-60}"
CARGO_FUZZ_VERSION=0.13.2

if ! cargo fuzz --version 2>/dev/null | grep -qF "$CARGO_FUZZ_VERSION"; then
    echo "== installing cargo-fuzz $CARGO_FUZZ_VERSION from crates.io"
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi
SANITIZER="${FUZZ_SANITIZER:-none}"
if [ "$SANITIZER" != none ]; then
    export RUSTC_BOOTSTRAP=1
fi
export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"
cd "$ROOT/fuzz"

new=0
for target in request email; do
    case "$target" in
    request) kind=requests ext=bin ;;
    email) kind=emails ext=eml ;;
    esac
    mkdir -p "corpus/$target" "artifacts/$target"
    # Seeds: every regression input of the kind (known crashes among them are reported and
    # passed over).
    cp "$ROOT/tests/fuzz-regressions/$kind"/* "corpus/$target/" 2>/dev/null || true
    echo "== fuzzing $target for ${SECS}s"
    cargo fuzz build --sanitizer "$SANITIZER" "$target"
    # One worker process that survives crashes, hangs (10 s per input) and OOMs, so a known
    # crash does not end the run.
    cargo fuzz run --sanitizer "$SANITIZER" "$target" "corpus/$target" -- \
        -max_total_time="$SECS" -timeout=10 -rss_limit_mb=4096 \
        -fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1 \
        >"artifacts/$target.log" 2>&1 || true
    grep -E '^#[0-9]+: cov|^INFO: fuzzed|^Done|==ERROR|panicked at' "artifacts/$target.log" | tail -n 5 || true
    # The checksums of the inputs already kept, so a known crash is not saved again.
    sums=$(for f in "$ROOT"/tests/fuzz-regressions/*/*; do sha1sum <"$f" | cut -d' ' -f1; done)
    for crash in "artifacts/$target"/crash-*; do
        [ -e "$crash" ] || continue
        sum=$(sha1sum <"$crash" | cut -d' ' -f1)
        if grep -qx "$sum" <<<"$sums"; then
            continue
        fi
        dest="$ROOT/tests/fuzz-regressions/$kind/libfuzzer-$target-${sum:0:12}.$ext"
        cp "$crash" "$dest"
        echo "NEW crash of $target saved as ${dest#"$ROOT"/}"
        new=1
    done
    for slow in "artifacts/$target"/timeout-* "artifacts/$target"/oom-*; do
        if [ -e "$slow" ]; then
            echo "slow or too large input (not saved): fuzz/$slow"
        fi
    done
done
exit "$new"
