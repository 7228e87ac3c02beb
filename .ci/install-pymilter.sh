#!/usr/bin/env bash
# Install Debian's pymilter (python3-milter: the Milter module on libmilter)
# into the system python3, for the tests that run `triomilter check` and
# `triomilter tap` against a libmilter-based milter.  Idempotent; run as
# root on Debian 12.  No service comes with the package.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "install-pymilter.sh: must run as root" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive

if ! /usr/bin/python3 -c 'import Milter' >/dev/null 2>&1; then
    # Only refresh the package lists when apt cannot find the package (a
    # fresh container has empty lists).
    if ! apt-cache show python3-milter >/dev/null 2>&1; then
        apt-get update -q
    fi
    if ! apt-get install -y -q --no-install-recommends python3-milter; then
        apt-get update -q
        apt-get install -y -q --no-install-recommends python3-milter
    fi
fi

/usr/bin/python3 -c 'import Milter; print("installed: pymilter", Milter.__version__)'
