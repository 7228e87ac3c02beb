"""Helpers for the server tests: run ``serve()`` in process, run subprocesses.

``served(milter, spec, **options)`` runs ``serve()`` in a child nursery via
``nursery.start`` (so it reports the bound address) and records how it ended
(returned, or raised — e.g. `MilterPanic`). Signals are not handled in
process (``handle_signals=False``): pytest owns the main thread's SIGINT;
signal handling is tested through subprocesses.
"""

from __future__ import annotations

import logging
import os
import signal
import socket as stdsocket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import trio

from triomilter import Milter, serve

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TIMEOUT = 10.0
"""Upper bound for any single wait in these tests (never a timing assertion)."""


class Served:
    """A running ``serve()``: its bound address and, once it ended, how."""

    def __init__(self) -> None:
        self.address: Any = None
        self.done = trio.Event()
        self.returned = False
        self.error: BaseException | None = None
        self.cancel_scope: trio.CancelScope | None = None

    async def wait(self, timeout: float = TIMEOUT) -> None:
        """Wait (bounded) until ``serve()`` ended."""
        with trio.fail_after(timeout):
            await self.done.wait()


class _Reporting:
    """Forwards ``task_status.started`` and remembers that it was called."""

    def __init__(self, task_status: trio.TaskStatus[object]) -> None:
        self.task_status = task_status
        self.reported = False

    def started(self, value: object = None) -> None:
        self.reported = True
        self.task_status.started(value)


@asynccontextmanager
async def served(
    milter: Milter, spec: str = "inet:0@127.0.0.1", **options: Any
) -> AsyncIterator[Served]:
    """Run ``serve(milter, spec, **options)`` for the body of the ``async with``.

    A start-up error (bad spec, socket in use) is raised by the ``async with``
    itself; how serve() ended later is in the `Served` object.
    """
    options.setdefault("handle_signals", False)
    srv = Served()

    async def run(task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED) -> None:
        reporting = _Reporting(task_status)
        try:
            await serve(milter, spec, task_status=reporting, **options)
        except Exception as exc:
            if not reporting.reported:
                raise  # a start-up error: nursery.start() raises it
            srv.error = exc
        else:
            srv.returned = True
        finally:
            srv.done.set()

    start_error: Exception | None = None
    async with trio.open_nursery() as nursery:
        srv.cancel_scope = nursery.cancel_scope
        try:
            srv.address = await nursery.start(run)
        except Exception as exc:
            start_error = exc
        else:
            try:
                yield srv
            finally:
                nursery.cancel_scope.cancel()
    if start_error is not None:
        raise start_error


def has_ipv6_loopback() -> bool:
    if not stdsocket.has_ipv6:
        return False
    try:
        with stdsocket.socket(stdsocket.AF_INET6, stdsocket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def connection_records(
    caplog: pytest.LogCaptureFixture, connection_id: str, level: int = 0
) -> list[logging.LogRecord]:
    """The ``triomilter`` records about connection ``connection_id`` (``#3``) at ``level``+."""
    tag = f"[{connection_id}]"
    return [
        r
        for r in caplog.records
        if r.name == "triomilter" and r.levelno >= level and tag in r.getMessage()
    ]


async def wait_until(predicate: Any, timeout: float = TIMEOUT) -> None:
    """Poll ``predicate()`` until true (bounded); for state only observable by polling."""
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - state only observable by polling
            await trio.sleep(0.01)


# --- subprocesses ---------------------------------------------------------------------


class Proc:
    """A subprocess in its own process group, stdout and stderr in a file."""

    def __init__(
        self, argv: list[str], log_path: Path, cwd: Path, env: dict[str, str] | None
    ) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in kill()
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), full_env.get("PYTHONPATH", "")) if p
        )
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.update(env or {})
        self.popen = subprocess.Popen(
            argv,
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_for_output(self, text: str, count: int = 1) -> str:
        """Wait (bounded) until ``text`` appeared ``count`` times in the output."""
        with trio.fail_after(TIMEOUT):
            while True:
                out = self.output()
                if out.count(text) >= count:
                    return out
                if self.popen.poll() is not None:
                    raise AssertionError(f"process exited ({self.popen.returncode}):\n{out}")
                await trio.sleep(0.02)

    async def wait(self, timeout: float = TIMEOUT) -> int:
        """Wait (bounded) for the exit status."""
        with trio.fail_after(timeout):
            while self.popen.poll() is None:  # noqa: ASYNC110 - a subprocess.Popen exit has no trio event
                await trio.sleep(0.02)
        return self.popen.returncode

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.popen.send_signal(signum)

    def kill(self) -> None:
        """Kill the process and everything in its group (workers), then reap it."""
        with suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()
        self._log.close()


class Spawner:
    """Starts ``python ARGS`` subprocesses; `kill_all` cleans them up."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[Proc] = []

    def __call__(self, *args: str, env: dict[str, str] | None = None, cwd: Path = REPO) -> Proc:
        return self.program(sys.executable, *args, env=env, cwd=cwd)

    def program(self, *argv: str, env: dict[str, str] | None = None, cwd: Path = REPO) -> Proc:
        """Start any program (``argv[0]`` looked up on PATH)."""
        log_path = self.tmp_path / f"proc{len(self.procs)}.log"
        proc = Proc(list(argv), log_path, cwd, env)
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.procs:
            proc.kill()


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for subprocesses that must be given one)."""
    with stdsocket.socket(stdsocket.AF_INET, stdsocket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


async def wait_connectable(host: str, port: int) -> None:
    with trio.fail_after(TIMEOUT):
        while True:
            try:
                stream = await trio.open_tcp_stream(host, port)
            except OSError:
                await trio.sleep(0.02)
                continue
            await stream.aclose()
            return
