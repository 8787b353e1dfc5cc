#!/usr/bin/env bash
# Installs mailbridge as a systemd service on a Debian host: the binary in /usr/local/bin, a
# system user `mailbridge`, the configuration in /etc/mailbridge (the shipped one, with the
# attachment folder moved to /var/lib/mailbridge, only when none is there yet: an existing
# configuration is never overwritten), the unit in /etc/systemd/system, the man page and the
# bash completion. Then:
#   systemctl enable --now mailbridge
#
# Options:
#   --binary PATH   install this binary instead of building one (cargo build --release)
#   --destdir DIR   install under DIR (packaging, tests): no user is made, systemd is not told
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BINARY=""
DESTDIR=""
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) BINARY="$2"; shift 2 ;;
        --destdir) DESTDIR="$2"; shift 2 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 64 ;;
    esac
done
log() { printf '==> %s\n' "$*" >&2; }

if [ -z "$BINARY" ]; then
    log "building mailbridge (release)"
    (cd "$ROOT" && cargo build --release --locked -q)
    BINARY="$ROOT/target/release/mailbridge"
fi
[ -x "$BINARY" ] || { echo "$BINARY is not an executable" >&2; exit 66; }

if [ -z "$DESTDIR" ] && ! id mailbridge >/dev/null 2>&1; then
    log "creating the system user mailbridge"
    useradd --system --home-dir /var/lib/mailbridge --no-create-home \
        --shell /usr/sbin/nologin --user-group mailbridge
fi
owner=(); [ -z "$DESTDIR" ] && owner=(-o root -g mailbridge)
data_owner=(); [ -z "$DESTDIR" ] && data_owner=(-o mailbridge -g mailbridge)

log "installing into ${DESTDIR:-/}"
install -D -m 0755 "$BINARY" "$DESTDIR/usr/local/bin/mailbridge"
install -d -m 0750 "${owner[@]}" "$DESTDIR/etc/mailbridge"
# The runtime account API (PUT/DELETE /api/tenants/...) writes tenant files: the service's own.
install -d -m 0770 "${owner[@]}" "$DESTDIR/etc/mailbridge/tenants.d"
install -d -m 0750 "${data_owner[@]}" "$DESTDIR/var/lib/mailbridge" "$DESTDIR/var/lib/mailbridge/attachments"
if [ ! -e "$DESTDIR/etc/mailbridge/mailbridge.toml" ]; then
    sed -e 's|^dir = "\.\./var/attachments".*|dir = "/var/lib/mailbridge/attachments"|' \
        "$ROOT/config/mailbridge.toml" > "$DESTDIR/etc/mailbridge/mailbridge.toml.new"
    install -m 0640 "${owner[@]}" "$DESTDIR/etc/mailbridge/mailbridge.toml.new" "$DESTDIR/etc/mailbridge/mailbridge.toml"
    rm -f "$DESTDIR/etc/mailbridge/mailbridge.toml.new"
    log "wrote /etc/mailbridge/mailbridge.toml (no tenants yet: add files to /etc/mailbridge/tenants.d)"
else
    log "kept the existing /etc/mailbridge/mailbridge.toml"
fi
if [ ! -e "$DESTDIR/etc/mailbridge/environment" ]; then
    # Secrets, read by the unit: the admin token and anything the config takes from the
    # environment (passwords, the link key). Readable by root and the service only.
    printf '# KEY=value lines for mailbridge (secrets: keep this file 0640 root:mailbridge)\n# MAILBRIDGE_ADMIN_TOKEN=\n' \
        > "$DESTDIR/etc/mailbridge/environment"
    chmod 0640 "$DESTDIR/etc/mailbridge/environment"
    [ -z "$DESTDIR" ] && chgrp mailbridge "$DESTDIR/etc/mailbridge/environment"
fi
install -D -m 0644 "$ROOT/deploy/mailbridge.service" "$DESTDIR/etc/systemd/system/mailbridge.service"
# The man page and bash completion, made from the binary's own command-line definition.
install -d "$DESTDIR/usr/local/share/man/man1" "$DESTDIR/usr/local/share/bash-completion/completions"
"$BINARY" man > "$DESTDIR/usr/local/share/man/man1/mailbridge.1"
"$BINARY" completions bash > "$DESTDIR/usr/local/share/bash-completion/completions/mailbridge"

if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    log "installed: systemctl enable --now mailbridge; logs: journalctl -u mailbridge"
else
    log "installed (systemd is not running here: the unit is in place for the next boot)"
fi
