#!/usr/bin/env bash
# Install Sendmail for the end-to-end tests WITHOUT replacing Postfix.
# Idempotent; run as root on Debian 12.
#
# Why not "apt-get install sendmail-bin": it Provides/Conflicts with
# mail-transport-agent, so apt would remove Postfix (which the Postfix e2e
# tests need).  Instead the .deb is downloaded and unpacked with dpkg-deb -x
# into a private prefix (no maintainer scripts run, no system instance, no
# /etc/mail, nothing on port 25).  The tests only ever run
# $PREFIX/usr/libexec/sendmail/sendmail with a private .cf inside their own mount
# and UTS namespace (see tests/e2e/sendmail.py).
#
# What is installed normally with apt-get: sendmail-bin's shared library
# dependencies, m4 and sendmail-cf (m4 files only, no conflict with Postfix)
# to build the .cf from an .mc, and util-linux's unshare.
set -euo pipefail

PREFIX="${SENDMAIL_PREFIX:-/opt/sendmail-private}"
BIN="$PREFIX/usr/libexec/sendmail/sendmail"

if [ "$(id -u)" -ne 0 ]; then
    echo "install-sendmail.sh: must run as root" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive

# Libraries sendmail-bin links against (its Depends minus the packages that
# would pull in an MTA), plus what builds the configuration.
PKGS=(m4 sendmail-cf libdb5.3 libldap-2.5-0 liblockfile1 libnsl2 libsasl2-2 libssl3 libwrap0
      util-linux mount hostname procps)

missing_pkgs() {
    local p
    for p in "${PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"
    done
}

lists_refreshed=0
refresh_lists() {
    if [ "$lists_refreshed" -eq 0 ]; then
        apt-get update -q
        lists_refreshed=1
    fi
}

mapfile -t need < <(missing_pkgs)
if ((${#need[@]})); then
    # Only refresh the package lists when apt cannot find the packages (a
    # fresh container has empty lists), like install-postfix.sh.
    if ! apt-cache show "${need[@]}" sendmail-bin >/dev/null 2>&1; then
        refresh_lists
    fi
    if ! apt-get install -y -q --no-install-recommends "${need[@]}"; then
        refresh_lists
        apt-get install -y -q --no-install-recommends "${need[@]}"
    fi
fi

# The binary: unpack sendmail-bin (same version as sendmail-cf) privately.
want_version="$(dpkg-query -W -f='${Version}' sendmail-cf)"
stamp="$PREFIX/.sendmail-bin-version"
if [ ! -x "$BIN" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want_version" ]; then
    work="$(mktemp -d /tmp/install-sendmail.XXXXXX)"
    # apt-get download drops to the _apt user: let it write there (else a warning).
    if id _apt >/dev/null 2>&1; then chown _apt "$work"; fi
    trap 'rm -rf "$work"' EXIT
    if ! (cd "$work" && apt-get download -q "sendmail-bin=$want_version"); then
        # That version left the archive (or the lists are stale): take the
        # current one of both packages.
        refresh_lists
        apt-get install -y -q --no-install-recommends sendmail-cf
        want_version="$(dpkg-query -W -f='${Version}' sendmail-cf)"
        (cd "$work" && apt-get download -q "sendmail-bin=$want_version")
    fi
    rm -rf "$PREFIX.new"
    mkdir -p "$PREFIX.new"
    dpkg-deb -x "$work"/sendmail-bin_*.deb "$PREFIX.new"
    echo "$want_version" >"$PREFIX.new/.sendmail-bin-version"
    rm -rf "$PREFIX"
    mv "$PREFIX.new" "$PREFIX"
fi

# Safety net: Postfix must still be there, and no system Sendmail was set up.
if dpkg-query -W -f='${Status}' sendmail-bin 2>/dev/null | grep -q 'install ok installed'; then
    echo "install-sendmail.sh: sendmail-bin is installed system-wide (it replaces Postfix)" >&2
    exit 1
fi
# The binary must at least load its libraries (ldd does not run it: running
# sendmail outside its namespace would resolve the host name, see
# tests/e2e/sendmail.py).
if [ ! -x "$BIN" ] || ldd "$BIN" | grep -q 'not found'; then
    ldd "$BIN" >&2 || true
    echo "install-sendmail.sh: $BIN is missing or misses libraries" >&2
    exit 1
fi
test -f /usr/share/sendmail/cf/m4/cf.m4
command -v m4 >/dev/null
command -v unshare >/dev/null
echo "installed: sendmail $(cat "$PREFIX/.sendmail-bin-version") in $PREFIX"
