# Shared by scripts/run.sh and scripts/test.sh: install and start what mailbridge needs on a
# Debian machine. Everything here is idempotent: what is installed and running is left alone.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
OS_USER="$(id -un)"

STARTED_RABBITMQ=""
STARTED_POSTGRES=""

log() { printf '==> %s\n' "$*" >&2; }

APT_UPDATED=""
apt_install() {
    if [ -z "$APT_UPDATED" ]; then
        log "apt-get update"
        $SUDO apt-get update -qq
        APT_UPDATED=1
    fi
    log "installing $*"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

ensure_rust() {
    if command -v cargo >/dev/null 2>&1; then return; fi
    if [ -x "$HOME/.cargo/bin/cargo" ]; then export PATH="$HOME/.cargo/bin:$PATH"; return; fi
    log "Rust is missing: installing it with rustup"
    command -v curl >/dev/null 2>&1 || apt_install curl ca-certificates
    apt_install build-essential
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component clippy,rustfmt
    export PATH="$HOME/.cargo/bin:$PATH"
}

ensure_rabbitmq() {
    if ! command -v rabbitmqctl >/dev/null 2>&1; then
        apt_install rabbitmq-server
    fi
    if ! $SUDO rabbitmqctl -q status >/dev/null 2>&1; then
        log "starting RabbitMQ"
        STARTED_RABBITMQ=1
        $SUDO rabbitmq-server -detached >/dev/null 2>&1 || true
        $SUDO rabbitmqctl -q await_startup --timeout 120 >/dev/null
    fi
}

ensure_postgres() {
    if ! command -v pg_ctlcluster >/dev/null 2>&1; then
        apt_install postgresql postgresql-client
    fi
    local version
    version="$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)"
    if [ -z "$version" ]; then
        version="$(ls /usr/lib/postgresql | sort -V | tail -n 1)"
        log "creating the PostgreSQL $version cluster"
        $SUDO pg_createcluster "$version" main >/dev/null
    fi
    if ! pg_isready -q -h /var/run/postgresql; then
        log "starting PostgreSQL $version"
        STARTED_POSTGRES="$version"
        $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start
        for _ in $(seq 1 60); do pg_isready -q -h /var/run/postgresql && break; sleep 0.5; done
    fi
    # A role for the OS user (libpq's default user), allowed to create the database.
    if ! psql -h /var/run/postgresql -d postgres -Atqc 'SELECT 1' >/dev/null 2>&1; then
        log "creating the PostgreSQL role $OS_USER"
        $SUDO su postgres -c "createuser --superuser '$OS_USER'" || true
    fi
}

# Dovecot (IMAP and POP3) for the inbound tests; the tests start their own instances.
ensure_dovecot() {
    if ! command -v dovecot >/dev/null 2>&1 || [ ! -e /usr/lib/dovecot/imap ] || [ ! -e /usr/lib/dovecot/pop3 ]; then
        apt_install dovecot-imapd dovecot-pop3d
    fi
    # Each idle IMAP session watches its maildir with inotify; the kernel's default of 128
    # instances per user is passed at a few hundred mailboxes (Dovecot then polls every 30 s).
    local instances=/proc/sys/fs/inotify/max_user_instances
    if [ -w "$instances" ] && [ "$(cat "$instances")" -lt 65536 ]; then
        echo 65536 > "$instances" || true
    elif [ -n "$SUDO" ] && [ "$(cat "$instances" 2>/dev/null || echo 65536)" -lt 65536 ]; then
        $SUDO sysctl -q -w fs.inotify.max_user_instances=65536 || true
    fi
}

# Node.js and npm for the benchmark's Node.js references (bench/reference/*).
ensure_node() {
    if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then return; fi
    apt_install nodejs npm
}

# mbsync (isync) for the benchmark's inbound reference (benches/reference/inbound.rs).
ensure_mbsync() {
    command -v mbsync >/dev/null 2>&1 || apt_install isync
}

# Headless Chromium and its WebDriver for the dashboard test (tests/dashboard.rs).
ensure_chromium() {
    if [ ! -x /usr/bin/chromedriver ] || ! command -v chromium >/dev/null 2>&1; then
        apt_install chromium chromium-driver
    fi
}

# systemd-analyze, which checks the unit file (tests/operations.rs).
ensure_systemd_analyze() {
    command -v systemd-analyze >/dev/null 2>&1 || apt_install systemd
}

# A Python virtualenv with the tests' packages (tests/requirements.txt), put first on PATH.
ensure_test_python() {
    command -v openssl >/dev/null 2>&1 || apt_install openssl
    command -v python3 >/dev/null 2>&1 || apt_install python3
    local venv="$ROOT/target/test-venv"
    local stamp="$venv/.requirements"
    if [ ! -x "$venv/bin/python3" ]; then
        python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv; rm -rf "$venv"; python3 -m venv "$venv"; }
    fi
    if ! cmp -s "$ROOT/tests/requirements.txt" "$stamp"; then
        log "installing the tests' Python packages"
        "$venv/bin/python3" -m pip install -q --disable-pip-version-check -r "$ROOT/tests/requirements.txt"
        cp "$ROOT/tests/requirements.txt" "$stamp"
    fi
    export PATH="$venv/bin:$PATH"
}

# Prints a PostgreSQL server URL (no database) that works for the OS user: TCP to localhost
# when the server accepts it without a password, else the local socket.
pg_server_url() {
    if psql "postgres://$OS_USER@127.0.0.1:5432/postgres" -Atqc 'SELECT 1' >/dev/null 2>&1 </dev/null; then
        echo "postgres://$OS_USER@127.0.0.1:5432"
    else
        echo "postgresql://$OS_USER@%2Fvar%2Frun%2Fpostgresql"
    fi
}

# Stops the services this script started (for the test script's exit trap).
stop_started_services() {
    if [ -n "$STARTED_RABBITMQ" ]; then log "stopping RabbitMQ (started by this script)"; $SUDO rabbitmqctl -q stop >/dev/null 2>&1 || true; fi
    if [ -n "$STARTED_POSTGRES" ]; then log "stopping PostgreSQL (started by this script)"; $SUDO pg_ctlcluster --skip-systemctl-redirect "$STARTED_POSTGRES" main stop || true; fi
}
