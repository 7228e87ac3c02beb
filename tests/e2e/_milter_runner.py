"""Run triomilter milters as real servers for the Postfix and Sendmail
end-to-end tests.

* `ThreadedMilter`: ``trio.run(triomilter.serve, ...)`` in a background thread,
  on a free loopback port, stopped through serve()'s ``shutdown`` event (then
  cancelled if it does not stop).  Handlers defined in the test module record
  what they saw into a thread-safe `Recorder`.
* `CliMilter`: ``python -m triomilter serve TARGET --socket inet:PORT@127.0.0.1``
  as a subprocess (the examples, panics, signals), output to a log file.
* `use_milter()`: start a threaded milter and point the test's Postfix at it;
  `use_sendmail_milter()` does the same for a Sendmail.

Every wait here is bounded; every thread and process is stopped on exit.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

import trio

import triomilter

from .postfix import PrivatePostfix, _listening, free_port
from .sendmail import DEFAULT_TIMEOUTS, PrivateSendmail, sendmail_spec

REPO = Path(__file__).resolve().parents[2]


def postfix_spec(port: int) -> str:
    """Postfix's endpoint syntax for a milter on 127.0.0.1:port."""
    return f"inet:127.0.0.1:{port}"


class Recorder:
    """Thread-safe list of ``(what, value)`` events, written by handlers."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._events: list[tuple[str, Any]] = []

    def add(self, what: str, value: Any = None) -> None:
        with self._lock:
            self._events.append((what, value))
            self._lock.notify_all()

    @property
    def events(self) -> list[tuple[str, Any]]:
        with self._lock:
            return list(self._events)

    def stages(self) -> list[str]:
        return [what for what, _ in self.events]

    def values(self, what: str) -> list[Any]:
        return [value for name, value in self.events if name == what]

    def one(self, what: str) -> Any:
        values = self.values(what)
        assert len(values) == 1, (what, values, self.stages())
        return values[0]

    def wait_for(self, what: str, count: int = 1, timeout: float = 10.0) -> list[Any]:
        """Wait until ``what`` was recorded ``count`` times (handlers may still
        run when the SMTP client already has its answer, e.g. on_close)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                values = [value for name, value in self._events if name == what]
                if len(values) >= count:
                    return values
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"{what!r} recorded {len(values)} time(s), expected {count}: "
                        f"{[name for name, _ in self._events]!r}"
                    )
                self._lock.wait(remaining)


class ThreadedMilter:
    """A `triomilter.Milter` served by ``triomilter.serve`` in a thread."""

    def __init__(
        self,
        milter: triomilter.Milter,
        *,
        shutdown_grace: float = 5.0,
        socket: str = "inet:0@127.0.0.1",
        **options: Any,
    ) -> None:
        self.milter = milter
        self.socket = socket
        self._options = {"shutdown_grace": shutdown_grace, **options}
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._shutdown: trio.Event | None = None
        self._scope: trio.CancelScope | None = None
        self.port = 0
        self.error: BaseException | None = None
        """What serve() raised (e.g. MilterPanic), once the thread ended."""

    @property
    def spec(self) -> str:
        return postfix_spec(self.port)

    @property
    def sendmail_spec(self) -> str:
        return sendmail_spec(self.port)

    def start(self, timeout: float = 10.0) -> ThreadedMilter:
        self._thread = threading.Thread(
            target=self._run, name=f"milter-{self.milter.name}", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"milter {self.milter.name!r} did not start within {timeout}s")
        if self.error is not None:
            raise RuntimeError(f"milter {self.milter.name!r} failed to start") from self.error
        return self

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            self.error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._shutdown = trio.Event()
        with trio.CancelScope() as scope:
            self._scope = scope
            async with trio.open_nursery() as nursery:
                address = await nursery.start(
                    partial(
                        triomilter.serve,
                        self.milter,
                        self.socket,
                        handle_signals=False,
                        shutdown=self._shutdown,
                        **self._options,
                    )
                )
                if isinstance(address, tuple):  # else a UNIX socket's path
                    self.port = address[1]
                self._ready.set()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _call_soon(self, fn: Callable[[], object]) -> None:
        if self._token is None or not self.running:
            return
        with contextlib.suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(fn, trio_token=self._token)

    def shutdown(self) -> None:
        """Graceful shutdown (what SIGTERM does), without waiting."""
        if self._shutdown is not None:
            self._call_soon(self._shutdown.set)

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful shutdown; cancel if it takes longer than ``timeout``.

        Raises if serve() failed meanwhile (e.g. `MilterPanic`: an assertion
        in a test's handler), so such a failure is not lost in a thread.
        """
        if self._thread is None:
            return
        self.shutdown()
        self._thread.join(timeout)
        if self._thread.is_alive() and self._scope is not None:
            self._call_soon(self._scope.cancel)
            self._thread.join(5.0)
        if self._thread.is_alive():
            raise RuntimeError(f"milter thread {self.milter.name!r} did not stop")
        if self.error is not None:
            raise RuntimeError(f"serve() of milter {self.milter.name!r} failed") from self.error

    def __enter__(self) -> ThreadedMilter:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@contextlib.contextmanager
def use_milter(
    postfix: PrivatePostfix,
    milter: triomilter.Milter,
    *,
    default_action: str | None = None,
    **options: Any,
) -> Iterator[ThreadedMilter]:
    """Serve ``milter`` in a thread and make ``postfix`` use it (reload)."""
    with ThreadedMilter(milter, **options) as served:
        postfix.set_milters(served.spec, default_action=default_action)
        yield served


@contextlib.contextmanager
def use_sendmail_milter(
    sendmail: PrivateSendmail,
    milter: triomilter.Milter,
    *,
    flags: str = "T",
    timeouts: str = DEFAULT_TIMEOUTS,
    macros: dict[str, str | None] | None = None,
    **options: Any,
) -> Iterator[ThreadedMilter]:
    """Serve ``milter`` in a thread and make ``sendmail`` use it (``F=flags``,
    ``T=timeouts``; a daemon restart)."""
    with ThreadedMilter(milter, **options) as served:
        sendmail.set_milter(served.sendmail_spec, flags=flags, timeouts=timeouts, macros=macros)
        yield served


class CliMilter:
    """``python -m triomilter serve TARGET`` on a free loopback port, or on
    ``port`` (e.g. to restart a milter at the address it had)."""

    def __init__(
        self,
        target: str,
        *extra_args: str,
        env: dict[str, str] | None = None,
        start_timeout: float = 20.0,
        port: int = 0,
    ) -> None:
        self.target = target
        self.extra_args = list(extra_args)
        self.env = {**os.environ, **(env or {})}
        self.start_timeout = start_timeout
        self._requested_port = port
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        fd, self.log_path = tempfile.mkstemp(prefix="triomilter-cli-", suffix=".log")
        os.close(fd)

    @property
    def spec(self) -> str:
        return postfix_spec(self.port)

    @property
    def sendmail_spec(self) -> str:
        return sendmail_spec(self.port)

    def start(self) -> CliMilter:
        for attempt in range(3):
            self.port = self._requested_port or free_port()
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "triomilter",
                        "serve",
                        self.target,
                        "--socket",
                        f"inet:{self.port}@127.0.0.1",
                        *self.extra_args,
                    ],
                    cwd=REPO,
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            deadline = time.monotonic() + self.start_timeout
            while not _listening("127.0.0.1", self.port):
                if self.proc.poll() is not None:
                    break
                if time.monotonic() > deadline:
                    self.kill()
                    raise TimeoutError(f"{self.target}: not listening\n{self.log_text()}")
                time.sleep(0.01)
            else:
                return self
            in_use = "address already in use" in self.log_text().lower()
            if not in_use or self._requested_port or attempt == 2:
                raise RuntimeError(
                    f"{self.target}: exited {self.proc.returncode} at start\n{self.log_text()}"
                )
        raise AssertionError("unreachable")

    def log_text(self) -> str:
        return Path(self.log_path).read_text(encoding="utf-8", errors="replace")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def wait(self, timeout: float = 15.0) -> int:
        """Wait for the process to exit; its exit status."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.target}: still running after {timeout}s\n{self.log_text()}"
            ) from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait (SIGKILL after ``timeout``); the exit status."""
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        return self.proc.returncode

    def __enter__(self) -> CliMilter:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.stop()
        finally:
            with contextlib.suppress(OSError):
                os.unlink(self.log_path)


def split_first_header(data: bytes) -> tuple[bytes, bytes]:
    """Split off the first header field (with its folded lines)."""
    end = 0
    while True:
        end = data.index(b"\r\n", end) + 2
        if data[end : end + 1] not in (b" ", b"\t"):
            return data[:end], data[end:]


def strip_received(data: bytes) -> bytes:
    """The message without Postfix's own (first) Received: header."""
    received, rest = split_first_header(data)
    assert received.startswith(b"Received: from "), received
    assert b"by mta.test.invalid (Postfix)" in received, received
    return rest


def header_fields(data: bytes) -> list[tuple[bytes, bytes]]:
    """The header fields of a delivered message as (name, raw value) pairs,
    folding CRLFs kept, the one space after the colon removed."""
    head = data.partition(b"\r\n\r\n")[0] + b"\r\n"
    fields: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + b"\r\n" + line)
        else:
            name, _, value = line.partition(b":")
            fields.append((name, value.removeprefix(b" ")))
    return fields


def header_values(data: bytes, name: bytes) -> list[bytes]:
    return [value for field, value in header_fields(data) if field.lower() == name.lower()]


def postcat(postfix: PrivatePostfix, queue_id: str) -> list[str]:
    """The envelope records of a queued message (``postcat -e -q``), as lines."""
    out = subprocess.run(
        ["postcat", "-c", postfix.config_dir, "-e", "-q", queue_id],
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"},
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout
    return out.splitlines()


def notify_flags(records: list[str]) -> dict[str, str | None]:
    """recipient -> its DSN notify_flags attribute (None if it has none)."""
    flags: dict[str, str | None] = {}
    pending: str | None = None
    for line in records:
        if line.startswith("named_attribute: notify_flags="):
            pending = line.partition("=")[2]
        elif line.startswith("recipient: "):
            flags[line.removeprefix("recipient: ")] = pending
            pending = None
        elif line.startswith(("named_attribute: dsn_orig_rcpt", "original_recipient:")):
            continue
        else:
            pending = None
    return flags


_SENDMAIL_RECEIVED = re.compile(
    rb"Received: from [^\r\n]*\r\n\tby mta\.test\.invalid \(8\.\d+\.\d+[^)]*\) "
    rb"with E?SMTP id (?P<qid>[0-9A-Za-z]{14})(?:;\r\n\t|\r\n\tfor <[^>]*>; )[^\r\n]+\r\n"
)


def strip_sendmail_received(data: bytes) -> bytes:
    """The message without Sendmail's own Received: header (the first one,
    or the second when a milter inserted a header above it)."""
    match = _SENDMAIL_RECEIVED.search(data)
    assert match, data[:400]
    return data[: match.start()] + data[match.end() :]


def sendmail_queue_id(data: bytes) -> str:
    """The queue id in Sendmail's Received: header."""
    match = _SENDMAIL_RECEIVED.search(data)
    assert match, data[:400]
    return match.group("qid").decode()
