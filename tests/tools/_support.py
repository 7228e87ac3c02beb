"""Helpers for the tools' tests: the command line in a subprocess, milters to run it against.

Every subprocess has a timeout and is killed on exit; all traffic is on
loopback.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from e2e.postfix import _listening, free_port

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SYSTEM_PYTHON = "/usr/bin/python3"
TIMEOUT = 60.0
"""Upper bound for one command (never a timing assertion)."""


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


@attrs.frozen
class Run:
    """What a finished command printed, and its exit status."""

    code: int
    stdout: bytes
    stderr: str

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.stdout)


def triomilter(*args: str, stdin: bytes | None = None, cwd: Path = REPO) -> Run:
    """``python -m triomilter ARGS`` to the end (bounded), its output and status."""
    done = subprocess.run(
        [sys.executable, "-m", "triomilter", *args],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        cwd=cwd,
        env=cli_env(),
        timeout=TIMEOUT,
        check=False,
    )
    return Run(done.returncode, done.stdout, done.stderr.decode("utf-8", "replace"))


def wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while not _listening("127.0.0.1", port):
        if proc.poll() is not None:
            raise RuntimeError(f"exited {proc.returncode}:\n{log.read_text(errors='replace')}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"not listening on {port}:\n{log.read_text(errors='replace')}")
        time.sleep(0.02)


def pymilter_missing() -> str | None:
    """Why the libmilter milter cannot run here, or None."""
    if not os.path.exists(SYSTEM_PYTHON):
        return f"{SYSTEM_PYTHON} not found"
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import Milter"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        return "pymilter is not installed (run .ci/install-pymilter.sh as root)"
    return None


def require_pymilter() -> None:
    """Skip (or, under CI, fail) when pymilter is missing."""
    reason = pymilter_missing()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the pymilter tests: {reason}", pytrace=False)
    pytest.skip(reason)


@contextlib.contextmanager
def process(argv: list[str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` (a server on 127.0.0.1:``port``) until the block ends; killed after."""
    fd, name = tempfile.mkstemp(prefix="tools-", suffix=".log")
    log = Path(name)
    with os.fdopen(fd, "wb") as out:
        proc = subprocess.Popen(
            argv, cwd=REPO, env=cli_env(), stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    try:
        wait_listening(port, proc, log)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log.unlink(missing_ok=True)


@contextlib.contextmanager
def pymilter_modifier() -> Iterator[str]:
    """The libmilter twin of modifier_milter.py; yields its socket spec."""
    port = free_port()
    with process([SYSTEM_PYTHON, str(HERE / "pymilter_modifier.py"), "--port", str(port)], port):
        yield f"inet:{port}@127.0.0.1"


@contextlib.contextmanager
def served(target: str) -> Iterator[str]:
    """``triomilter serve TARGET`` on a free port; yields its socket spec."""
    port = free_port()
    spec = f"inet:{port}@127.0.0.1"
    argv = [sys.executable, "-m", "triomilter", "serve", target, "--socket", spec]
    with process(argv, port):
        yield spec


class TapProcess:
    """A running ``triomilter tap --json``: where the MTA connects, and its output so far."""

    def __init__(self, spec: str, out: Path, proc: subprocess.Popen[bytes]) -> None:
        self.spec = spec
        self.out = out
        self.proc = proc
        self.status: int | None = None

    def events(self) -> list[dict[str, Any]]:
        """Every complete JSON line written so far."""
        lines = self.out.read_bytes().split(b"\n")
        return [json.loads(line) for line in lines[:-1] if line.strip()]

    def wait_for(self, kind: str, count: int = 1) -> list[dict[str, Any]]:
        """Wait (bounded) until ``count`` events of type ``kind`` were written."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            found = [e for e in self.events() if e["type"] == kind]
            if len(found) >= count:
                return found
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{count} x {kind!r} expected; got:\n{self.events()}")
            time.sleep(0.02)

    def stop(self) -> int:
        """SIGTERM, and the exit status (0 expected)."""
        if self.status is None:
            self.proc.terminate()
            try:
                self.status = self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.status = self.proc.wait(10)
        return self.status


@contextlib.contextmanager
def tap(milter: str, *options: str) -> Iterator[TapProcess]:
    """``triomilter tap --json`` on a free port in front of ``milter`` (a socket spec)."""
    port = free_port()
    spec = f"inet:{port}@127.0.0.1"
    directory = Path(tempfile.mkdtemp(prefix="tap-"))
    out, log = directory / "out.jsonl", directory / "stderr.log"
    argv = [sys.executable, "-m", "triomilter", "tap", "--listen", spec, "--milter", milter]
    with open(out, "wb") as stdout, open(log, "wb") as stderr:
        proc = subprocess.Popen(
            [*argv, "--json", *options],
            cwd=REPO,
            env=cli_env(),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
        )
    tapped = TapProcess(spec, out, proc)
    try:
        wait_listening(port, proc, log)
        yield tapped
    finally:
        tapped.stop()
        for path in (out, log):
            path.unlink(missing_ok=True)
        directory.rmdir()
