#!/usr/bin/env bash
# Prepare everything benchmarks/run.py needs.  Idempotent: each step is
# skipped when its result is already there and up to date.
#
#   1. Debian packages: libmilter-dev (pymilter builds against it), gcc.
#   2. milterload (Rust, std only, built offline) -> .build/milterload/release/milterload
#   3. the C no-op responder                      -> .build/noop_responder
#   4. the peers' venv .venv-peers (pymilter, purepythonmilter,
#      kilter-service, trio), pinned by peers/requirements.txt
#
# Environment: MILTERLOAD_SRC (default: shared/tools/milterload beside the
# repository, then /work/shared/tools/milterload), PYTHON (default python3,
# must be 3.11+).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
BUILD="$HERE/.build"
VENV="$HERE/.venv-peers"
PYTHON="${PYTHON:-python3}"
export PATH="$PATH:${HOME:-/root}/.cargo/bin"
mkdir -p "$BUILD"

say() { printf 'setup.sh: %s\n' "$*" >&2; }

# 1. Debian packages
need_pkgs=()
dpkg-query -W -f='${Status}' libmilter-dev 2>/dev/null | grep -q 'install ok installed' || need_pkgs+=(libmilter-dev)
command -v gcc >/dev/null 2>&1 || need_pkgs+=(build-essential)
command -v taskset >/dev/null 2>&1 || need_pkgs+=(util-linux)
if ! command -v cargo >/dev/null 2>&1; then need_pkgs+=(cargo); fi
if ((${#need_pkgs[@]})); then
    say "installing ${need_pkgs[*]}"
    if [ "$(id -u)" -ne 0 ]; then
        say "need root for apt-get install ${need_pkgs[*]}"; exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

# 2. milterload
if [ -z "${MILTERLOAD_SRC:-}" ]; then
    for d in "$REPO/../shared/tools/milterload" /work/shared/tools/milterload; do
        if [ -f "$d/Cargo.toml" ]; then MILTERLOAD_SRC="$d"; break; fi
    done
fi
if [ -z "${MILTERLOAD_SRC:-}" ] || [ ! -f "$MILTERLOAD_SRC/Cargo.toml" ]; then
    say "milterload source not found (set MILTERLOAD_SRC)"; exit 1
fi
ML="$BUILD/milterload/release/milterload"
if [ ! -x "$ML" ] || [ -n "$(find "$MILTERLOAD_SRC/src" "$MILTERLOAD_SRC/Cargo.toml" -newer "$ML" -print -quit)" ]; then
    say "building milterload from $MILTERLOAD_SRC"
    # The source tree is read-only: keep every build product under .build.
    cargo build --release --offline --quiet \
        --manifest-path "$MILTERLOAD_SRC/Cargo.toml" --target-dir "$BUILD/milterload"
fi

# 3. no-op responder
NOOP="$BUILD/noop_responder"
if [ ! -x "$NOOP" ] || [ "$HERE/peers/noop_responder.c" -nt "$NOOP" ]; then
    say "compiling noop_responder"
    gcc -O2 -Wall -Wextra -o "$NOOP" "$HERE/peers/noop_responder.c"
fi

# 4. peers' venv
REQ="$HERE/peers/requirements.txt"
STAMP="$VENV/.requirements.sha256"
want="$(sha256sum "$REQ" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { say "$PYTHON is not 3.11+"; exit 1; }
    say "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
    say "installing peers (peers/requirements.txt)"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQ"
    "$VENV/bin/python" -c 'import Milter, purepythonmilter, kilter.service, trio, anyio'
    echo "$want" > "$STAMP"
fi
say "ready: $ML, $NOOP, $VENV"
