#!/usr/bin/env bash
# systemd's command-line tools for the socket-activation tests
# (systemd-socket-activate), without booting or enabling anything.
# Idempotent; run as root on Debian 12.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "install-systemd.sh: must run as root" >&2
    exit 1
fi
if command -v systemd-socket-activate >/dev/null 2>&1; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-cache show systemd >/dev/null 2>&1; then
    apt-get update -q
fi
apt-get install -y -q --no-install-recommends systemd
command -v systemd-socket-activate
