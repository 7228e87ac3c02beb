#!/usr/bin/env bash
# Install HAProxy for the end-to-end scale-out test, without a running system
# instance.  Idempotent; run as root on Debian 12.
#
# Why no system instance: the test starts its own private HAProxy, bound to
# 127.0.0.1 only, with a config file in a temp dir.  The package's service
# would start at install time with /etc/haproxy/haproxy.cfg; nothing of it
# is wanted, and nothing may listen on a public interface.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "install-haproxy.sh: must run as root" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive

if ! command -v haproxy >/dev/null 2>&1; then
    # Keep the package scripts from starting the service (invoke-rc.d and
    # deb-systemd-invoke honour policy-rc.d; 101 = "action forbidden").  A
    # policy-rc.d that is already there (Docker images ship one) is left alone.
    created_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    remove_policy() {
        if [ -n "$created_policy" ]; then
            rm -f /usr/sbin/policy-rc.d
        fi
    }
    trap remove_policy EXIT
    # Only refresh the package lists when apt cannot find the package (a
    # fresh container has empty lists).
    if ! apt-cache show haproxy >/dev/null 2>&1; then
        apt-get update -q
    fi
    if ! apt-get install -y -q --no-install-recommends haproxy; then
        apt-get update -q
        apt-get install -y -q --no-install-recommends haproxy
    fi
    remove_policy
    trap - EXIT
fi

# Make sure no system instance runs or starts at boot: stop it through its
# service manager, then by the pid file the Debian init script uses.
# "systemctl disable" also works while systemd is not running (containers).
if command -v systemctl >/dev/null 2>&1; then
    if [ -d /run/systemd/system ]; then
        systemctl stop haproxy >/dev/null 2>&1 || true
    fi
    systemctl disable haproxy >/dev/null 2>&1 || true
fi
if [ ! -d /run/systemd/system ] && [ -x /etc/init.d/haproxy ]; then
    /etc/init.d/haproxy stop >/dev/null 2>&1 || true
fi
if command -v update-rc.d >/dev/null 2>&1; then
    update-rc.d haproxy disable >/dev/null 2>&1 || true
fi
pidfile=/run/haproxy.pid
if [ -s "$pidfile" ]; then
    for pid in $(tr -c '0-9' ' ' <"$pidfile"); do
        if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = haproxy ]; then
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 1 50); do
                [ -d "/proc/$pid" ] || break
                sleep 0.1
            done
        fi
    done
fi

# No haproxy process may be left that the tests did not start: the system
# instance runs from /etc/haproxy/haproxy.cfg (the tests never use it).
for comm in /proc/[0-9]*/comm; do
    [ "$(cat "$comm" 2>/dev/null)" = haproxy ] || continue
    dir=${comm%/comm}
    if tr '\0' ' ' 2>/dev/null <"$dir/cmdline" | grep -q '/etc/haproxy/'; then
        echo "install-haproxy.sh: a system haproxy still runs (${dir#/proc/})" >&2
        exit 1
    fi
done

haproxy -v | sed -n '1s/^/installed: /p'  # sed reads it all: no SIGPIPE under pipefail
