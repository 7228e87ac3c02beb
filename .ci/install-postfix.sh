#!/usr/bin/env bash
# Install Postfix + OpenDKIM's miltertest for the end-to-end tests, without a
# running system instance.  Idempotent; run as root on Debian 12.
#
# Why "No configuration": the tests start their own private, loopback-only
# Postfix with its own config dir; a system instance would grab port 25 and
# could deliver mail somewhere real.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "install-postfix.sh: must run as root" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive

have_all() {
    command -v postfix >/dev/null 2>&1 &&
        command -v postconf >/dev/null 2>&1 &&
        command -v miltertest >/dev/null 2>&1
}

if ! have_all; then
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    # Only refresh the package lists when they are missing or apt cannot find
    # the packages (a fresh container has empty lists).
    if ! apt-cache show postfix miltertest >/dev/null 2>&1; then
        apt-get update -q
    fi
    if ! apt-get install -y -q --no-install-recommends postfix miltertest; then
        apt-get update -q
        apt-get install -y -q --no-install-recommends postfix miltertest
    fi
fi

# Make sure no system instance runs: the tests use only private instances.
if [ -e /etc/postfix/main.cf ] && postfix status >/dev/null 2>&1; then
    postfix stop || true
fi
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl stop postfix >/dev/null 2>&1 || true
    systemctl disable postfix >/dev/null 2>&1 || true
fi
# A master started by the package scripts without systemd (no pid file known
# to "postfix status" if config is absent): stop it by its pid file.
pidfile=/var/spool/postfix/pid/master.pid
if [ -s "$pidfile" ]; then
    pid=$(tr -dc '0-9' <"$pidfile")
    if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = master ]; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do
            [ -d "/proc/$pid" ] || break
            sleep 0.1
        done
    fi
fi

# Nothing may listen on port 25 (0x0019); /proc works without iproute2.
if awk 'NR > 1 && $4 == "0A" && $2 ~ /:0019$/ { found = 1 } END { exit !found }' \
    /proc/net/tcp /proc/net/tcp6 2>/dev/null; then
    echo "install-postfix.sh: something still listens on port 25" >&2
    exit 1
fi

postconf -d mail_version 2>/dev/null | sed 's/^/installed: postfix /' || true
command -v miltertest
