"""`triomilter tap`: a transparent proxy between an MTA and a milter that shows what they say.

The MTA connects to the tap (``--listen``); the tap connects to the real
milter (``--milter``, any implementation) and forwards every byte, both
ways, unchanged, as soon as it arrives. On the way, an `Observer`
(`_tap_observer`) frames each direction and follows the codes, so that a
reply is never shown before the command it answers; decoding the
arguments and writing the lines happen in a writer task, off the
forwarding path.

One line per command and per reply (text, or JSON with ``--json``): the
connection id, who spoke, the decoded arguments, the macros that came with
a command, the time the milter took to answer. Protocol violations (a reply
where none is owed, a missing reply, an action that was not negotiated, an
unknown code, a malformed packet) and slow replies (``--slow``) are
flagged, and the bytes are forwarded all the same: the tap never breaks a
connection the MTA and the milter would keep.

Bounds: each direction holds at most one packet of up to 65535 data bytes
for decoding (body chunks and larger packets are counted as they stream
past); output lines wait in a queue of ``--max-queue`` lines and are
dropped (and counted) rather than slow down the traffic when the output
cannot keep up; ``--max-connections`` connections are served at once;
every connection has an idle timeout, connecting to the milter a timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import itertools
import logging
import math
import os
import signal
import sys
from collections.abc import Callable
from typing import IO, Any

import attrs
import trio

from ._context import SocketFamily
from ._display import os_error
from ._sockets import SocketSpecError, describe_address, open_listener
from ._sockets import parse_socket_spec as _parse_socket_spec
from ._tap_observer import Event, Observer, format_json, format_text

log = logging.getLogger("triomilter")

RECEIVE_SIZE = 65536
LINGER = 0.02
"""Seconds the writer waits for more lines before a write (fewer, larger writes)."""
FLUSH_TIMEOUT = 2.0
"""Seconds the last lines may take to be written when the tap stops."""
_SLICE = 16
"""Events formatted between two checkpoints of the writer."""
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


# --- output ------------------------------------------------------------------------------


class Output:
    """Lines to a text stream through a bounded queue, formatted and written in batches.

    `emit` never blocks: when the queue is full the event is dropped and
    counted, and a line saying how many were dropped follows once there is
    room again. The writer formats (decodes) the events, then writes them
    in a thread, so that a slow reader (a terminal, a pipe) never blocks
    the forwarding.
    """

    def __init__(self, stream: IO[str], formatter: Callable[[Event], str], size: int) -> None:
        self.stream = stream
        self.formatter = formatter
        self._send, self._receive = trio.open_memory_channel[Event](size)
        self.dropped = 0

    def emit(self, events: list[Event]) -> None:
        for event in events:
            try:
                if self.dropped:
                    message = f"{self.dropped} line(s) dropped: output too slow"
                    self._send.send_nowait(Event(0, "dropped", message=message))
                    self.dropped = 0
                self._send.send_nowait(event)
            except trio.WouldBlock:
                self.dropped += 1

    async def run(self) -> None:
        """Write lines until cancelled; then what is queued, for at most `FLUSH_TIMEOUT`."""
        batch: list[Event] = []
        try:
            while True:
                batch = [await self._receive.receive()]
                await trio.sleep(LINGER)
                batch += self._drain()
                await self._write(batch)
                batch = []
        finally:
            # Bounded: a reader that stopped reading must not keep the tap from exiting.
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + FLUSH_TIMEOUT
                await self._write(batch + self._drain())

    def _drain(self) -> list[Event]:
        batch = []
        while True:
            try:
                batch.append(self._receive.receive_nowait())
            except trio.WouldBlock:
                return batch

    async def _write(self, events: list[Event]) -> None:
        if not events:
            return
        lines = []
        for start in range(0, len(events), _SLICE):
            lines += [self.formatter(event) + "\n" for event in events[start : start + _SLICE]]
            await trio.lowlevel.checkpoint()  # the forwarding goes first: a slice at a time
        # A write blocked on a full pipe is abandoned on cancellation (its thread
        # finishes or not on its own): the forwarding never waits for it.
        await trio.to_thread.run_sync(self._write_sync, "".join(lines), abandon_on_cancel=True)

    def _write_sync(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed pipe: the tap goes on forwarding


# --- the proxy ---------------------------------------------------------------------------


@attrs.frozen
class TapOptions:
    listen: str
    milter: str
    json: bool = False
    slow_ms: float | None = None
    reply_timeout: float = 30.0
    """After this long without a reply, a missing reply is reported; also the connect timeout."""
    idle_timeout: float = 7210.0
    max_connections: int = 1000
    max_queue: int = 10000


class Tap:
    """Accepts MTA connections, runs one `_Connection` each, and watches for missing replies."""

    def __init__(self, options: TapOptions, output: Output) -> None:
        self.options = options
        self.output = output
        self.milter = _parse_socket_spec(options.milter)
        self._ids = itertools.count(1)
        # Taken by the accept loop, given back by the connection (a CapacityLimiter
        # token belongs to the task that took it).
        self._limit = trio.Semaphore(options.max_connections)
        self.observers: dict[int, Observer] = {}

    async def serve(
        self, listener: trio.SocketListener, task_status: trio.TaskStatus[object]
    ) -> None:
        async with listener, trio.open_nursery() as nursery:
            nursery.start_soon(self._watch)
            task_status.started(listener.socket.getsockname())
            full = False
            while True:
                await self._limit.acquire()
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    self._limit.release()
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    if not full:
                        log.warning("tap: cannot accept: %s; retrying", exc.strerror)
                    full = True
                    await trio.sleep(0.1)
                    continue
                full = False
                nursery.start_soon(self._connection, stream, next(self._ids))

    async def _connection(self, stream: trio.SocketStream, conn: int) -> None:
        connection = _Connection(self, stream, conn)
        self.observers[conn] = connection.observer
        try:
            await connection.run()
        finally:
            del self.observers[conn]
            self._limit.release()

    async def _watch(self) -> None:
        """Reports replies that do not come within ``reply_timeout`` (once per command).

        One task for all connections, waking a few times per timeout: the
        forwarding itself never wakes it.
        """
        limit = self.options.reply_timeout
        while True:
            await trio.sleep(min(1.0, limit / 4))
            now = trio.current_time()
            for observer in list(self.observers.values()):
                self.output.emit(observer.overdue(now, limit))

    async def open_milter(self) -> trio.SocketStream:
        spec = self.milter
        if spec.family is SocketFamily.UNIX:
            return await trio.open_unix_socket(spec.path)
        host = spec.host or ("::1" if spec.family is SocketFamily.INET6 else "127.0.0.1")
        return await trio.open_tcp_stream(host, spec.port)


class _Connection:
    def __init__(self, tap: Tap, stream: trio.SocketStream, conn: int) -> None:
        self.tap = tap
        self.mta = stream
        self.conn = conn
        self.options = tap.options
        self.observer = Observer(conn, slow_ms=tap.options.slow_ms)
        self.emit = tap.output.emit
        self.scope = trio.CancelScope()
        self.done = 0

    async def run(self) -> None:
        options = self.options
        self.emit([Event(self.conn, "open", "mta", message=f"connection from {_peer(self.mta)}")])
        try:
            with trio.fail_after(options.reply_timeout):
                milter = await self.tap.open_milter()
        except (OSError, trio.TooSlowError) as exc:
            reason = "timeout" if isinstance(exc, trio.TooSlowError) else os_error(exc)
            message = f"cannot connect to the milter {options.milter}: {reason}"
            self.emit([Event(self.conn, "error", message=message)])
            with trio.CancelScope(shield=True):
                await self.mta.aclose()
            self.emit([Event(self.conn, "close", message="closed")])
            return
        ended = "closed"
        with self.scope:
            self.scope.deadline = trio.current_time() + options.idle_timeout
            try:
                async with self.mta, milter, trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, self.mta, milter, "mta", nursery.cancel_scope)
                    nursery.start_soon(self._pump, milter, self.mta, "milter", nursery.cancel_scope)
            except Exception as exc:  # never crash the tap for one connection
                ended = f"ended by an error: {exc!r}"
        if self.scope.cancelled_caught:
            ended = f"closed: idle for {options.idle_timeout:g} s"
        observer = self.observer
        counts = f"{observer.commands} command(s), {observer.replies} reply(ies)"
        self.emit([Event(self.conn, "close", message=f"{ended}; {counts}")])

    async def _pump(
        self,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        side: str,
        both: trio.CancelScope,
    ) -> None:
        feed = self.observer.from_mta if side == "mta" else self.observer.from_milter
        who = "the MTA" if side == "mta" else "the milter"
        idle = self.options.idle_timeout
        extended = -math.inf
        decoding = True
        fd = source.socket.fileno()
        try:
            chunks = 0
            while data := await _receive(fd):
                now = trio.current_time()
                chunks += 1
                if chunks % _FAIRNESS == 0:
                    await trio.lowlevel.checkpoint()  # others get their turn
                if now - extended > 1.0:  # the idle deadline moves once a second at most
                    self.scope.deadline = now + idle
                    extended = now
                if decoding:
                    # Before the bytes go on, so that the other side's reaction is
                    # never shown before its cause; the observer only frames and
                    # follows codes (the writer decodes).
                    try:
                        self.emit(feed(data, now))
                    except Exception as exc:  # a bug must not cost the connection
                        decoding = False
                        message = f"decoding stopped: {exc!r}"
                        self.emit([Event(self.conn, "error", side, message=message)])
                await _send_all(sink, data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            cause = exc.__cause__ or exc
            self.emit([Event(self.conn, "eof", side, message=f"{who}: connection lost ({cause})")])
            both.cancel()
            return
        self.emit([Event(self.conn, "eof", side, message=f"{who} closed its side")])
        self.emit(self.observer.closed(side))
        try:
            await sink.send_eof()  # half-close: the other side may still answer
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            both.cancel()
        self.done += 1
        if self.done == 2:
            both.cancel()


# The forwarding path works on the sockets' descriptors (non-blocking, as Trio
# keeps them) and waits through Trio only when a socket would block: a
# SocketStream's receive_some and send_all yield to the scheduler twice each
# even when data is there, which made up most of the tap's CPU per message.
_FAIRNESS = 16
"""A pump yields to the others at least every this many chunks."""


async def _receive(fd: int) -> bytes:
    """The next bytes from socket ``fd`` (b"" at end of stream), waiting only if none are there."""
    while True:
        try:
            return os.read(fd, RECEIVE_SIZE)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(fd)


async def _send_all(sink: trio.SocketStream, data: bytes) -> None:
    fd = sink.socket.fileno()
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(fd)


def _peer(stream: trio.SocketStream) -> str:
    try:
        address = stream.socket.getpeername()
    except OSError:
        return "?"
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address) or "a UNIX socket"


async def run_tap(
    options: TapOptions,
    stream: IO[str],
    *,
    task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED,
    handle_signals: bool = True,
) -> None:
    """Run the tap until cancelled (or SIGTERM/SIGINT with ``handle_signals``).

    Raises `SocketSpecError` for a bad spec or an address in use, before
    anything is accepted.
    """
    output = Output(stream, format_json if options.json else format_text, options.max_queue)
    tap = Tap(options, output)
    spec = _parse_socket_spec(options.listen)
    listener = await open_listener(spec)
    socket_file = _file_id(spec.path) if spec.path else None
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(output.run)
            if handle_signals:
                nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
            address = await nursery.start(tap.serve, listener)
            log.info("tap listening on %s, forwarding to %s", describe_address(address), tap.milter)
            task_status.started(address)
    finally:
        # Our UNIX socket file goes with us (not one a successor bound meanwhile).
        if socket_file is not None and _file_id(spec.path) == socket_file:
            with contextlib.suppress(OSError):
                os.unlink(spec.path)


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino)


async def _stop_on_signal(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("tap: %s received, stopping", signal.Signals(signum).name)
            scope.cancel()
            return


# --- the command line ----------------------------------------------------------------------

DESCRIPTION = """\
A transparent proxy between an MTA and a milter that shows what they say:
point the MTA at --listen; every byte goes to the milter at --milter and
back unchanged. Prints one line per command and reply (the connection, the
decoded arguments, the macros, the milter's reply time) and flags protocol
violations and slow replies, without breaking the connection.
"""


def add_tap_parser(commands: Any) -> None:
    tap: argparse.ArgumentParser = commands.add_parser(
        "tap",
        help="show what an MTA and a milter say to each other",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit status: 0 after SIGTERM/SIGINT, 2 for usage errors (bad specs), "
        "1 if the address cannot be listened on",
    )
    tap.add_argument("--listen", "-l", required=True, metavar="SPEC", help="where the MTA connects")
    tap.add_argument("--milter", "-m", required=True, metavar="SPEC", help="the real milter")
    tap.add_argument("--json", action="store_true", help="JSON lines instead of text")
    tap.add_argument("--slow", type=float, metavar="MS", help="flag replies slower than MS ms")
    tap.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="connecting to the milter; a reply later than this is reported missing (30)",
    )
    tap.add_argument(
        "--idle-timeout",
        type=float,
        default=7210.0,
        metavar="SECONDS",
        help="close a connection silent this long (7210)",
    )
    tap.add_argument(
        "--max-connections", type=int, default=1000, metavar="N", help="at once (1000)"
    )
    tap.add_argument(
        "--max-queue",
        type=int,
        default=10000,
        metavar="LINES",
        help="output lines waiting to be written; more are dropped (10000)",
    )
    tap.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")


def tap_command(args: argparse.Namespace) -> int:
    options = TapOptions(
        args.listen,
        args.milter,
        json=args.json,
        slow_ms=args.slow,
        reply_timeout=args.timeout,
        idle_timeout=args.idle_timeout,
        max_connections=args.max_connections,
        max_queue=args.max_queue,
    )
    try:
        _parse_socket_spec(options.listen)
        _parse_socket_spec(options.milter)
        for name, value in (("--timeout", args.timeout), ("--idle-timeout", args.idle_timeout)):
            if not value > 0:
                raise ValueError(f"{name} must be positive")
        if args.max_connections < 1 or args.max_queue < 1:
            raise ValueError("--max-connections and --max-queue must be at least 1")
    except ValueError as exc:
        print(f"triomilter: {exc}", file=sys.stderr)
        return 2
    try:
        trio.run(run_tap, options, sys.stdout)
    except SocketSpecError as exc:
        log.error("tap: %s", exc)
        return 1
    return 0


__all__ = ["Output", "TapOptions", "run_tap"]
