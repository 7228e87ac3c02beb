"""`serve()`: the Trio server running a `Milter` (SPEC §2.1 panics, §2.4, §3).

One nursery per connection runs the dispatcher on the socket stream; this
module knows sockets, limits, signals and shutdown, and no packet layouts.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import math
import os
import signal
import socket as stdsocket
import threading

import trio

from ._dispatch import Tripwire, handle_connection
from ._errors import MilterPanic
from ._milter import Milter
from ._sockets import SocketSpec, describe_address, open_listener, parse_socket_spec
from .protocol import MAX_DATA_SIZE

log = logging.getLogger("triomilter")

# Errors that mean "out of resources, try again later" (trio's serve_listeners).
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ACCEPT_RETRY_DELAY = 0.1


async def serve(
    milter: Milter,
    socket: str,
    *,
    task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED,
    io_timeout: float = 7210.0,
    max_connections: int = 1000,
    backlog: int | None = None,
    max_data_size: int = MAX_DATA_SIZE,
    remove_stale_socket: bool = True,
    socket_mode: int | None = None,
    shutdown_grace: float = 30.0,
    panic_grace: float = 1.0,
    handle_signals: bool = True,
    shutdown: trio.Event | None = None,
    reuse_port: bool = False,
) -> None:
    """Serve ``milter`` on ``socket`` (``inet:PORT@HOST``, ``inet6:PORT@HOST``, ``unix:/path``).

    Runs until cancelled, shut down, or a handler panics. With
    ``nursery.start(serve, ...)`` the bound address is reported (a
    ``(host, port)`` tuple for inet, ``(host, port, flowinfo, scope_id)`` for
    inet6, the path for unix), so port 0 works.

    Options: ``io_timeout`` (seconds to wait for a command or a write, libmilter's
    7210 s default); ``max_connections`` (excess connections wait in the listen
    backlog); ``backlog``; ``max_data_size`` (largest packet accepted);
    ``remove_stale_socket`` and ``socket_mode`` for UNIX sockets;
    ``reuse_port`` (SO_REUSEPORT, for several processes on one address).

    Shutdown:

    - Graceful: on SIGTERM/SIGINT (when ``handle_signals`` and running in the
      main thread) or when the ``shutdown`` event is set: stop accepting, answer
      new messages TEMPFAIL, let connections finish the message they are in for
      up to ``shutdown_grace`` seconds, then cancel every connection and
      return. A second signal cancels at once.
    - Panic (SPEC §2.1): the panicking command is answered TEMPFAIL; from then
      on no handler runs and every owed reply is TEMPFAIL; the listener
      closes; handlers still running get up to ``panic_grace`` seconds; then
      every connection is cancelled and `MilterPanic` is raised with the
      handler's exception as ``__cause__``. ``on_abort``/``on_close`` do not run.
    - Cancellation from outside stops at once: connections are closed, the
      UNIX socket file is removed.

    Error handling: a connection's protocol error, timeout or disconnect ends
    that connection only (after ``on_abort``/``on_close``) with one log line;
    accept errors meaning "out of file descriptors or memory" are logged and
    retried after 100 ms; other accept errors propagate. Bad socket specs
    raise ``SocketSpecError`` (a ``ValueError``) before anything is bound.
    """
    spec = parse_socket_spec(socket)
    if max_connections < 1:
        raise ValueError(f"max_connections must be at least 1, got {max_connections}")
    for name, value in (
        ("io_timeout", io_timeout),
        ("shutdown_grace", shutdown_grace),
        ("panic_grace", panic_grace),
    ):
        if math.isnan(value) or value < 0 or (name == "io_timeout" and value == 0):
            raise ValueError(f"{name} must be positive, got {value}")
    if max_data_size < 65535:
        raise ValueError(f"max_data_size must be at least 65535, got {max_data_size}")
    listener = await open_listener(
        spec,
        backlog=backlog,
        reuse_port=reuse_port,
        remove_stale_socket=remove_stale_socket,
        socket_mode=socket_mode,
    )
    # Our socket file, to remove on exit only if it is still ours: a successor
    # may have replaced it while we drained (a restart).
    socket_file = _file_id(spec.path) if spec.family == "unix" else None
    server = _Server(
        milter,
        spec,
        listener,
        io_timeout=io_timeout,
        max_connections=max_connections,
        max_data_size=max_data_size,
        shutdown_grace=shutdown_grace,
        panic_grace=panic_grace,
    )
    try:
        await server.run(task_status, handle_signals, shutdown)
    finally:
        with trio.CancelScope(shield=True):
            await listener.aclose()
        if socket_file is not None and _file_id(spec.path) == socket_file:
            with contextlib.suppress(OSError):
                os.unlink(spec.path)
    if server.tripwire.panic is not None:
        raise MilterPanic(
            f"milter {milter.name!r} shut down after a handler panicked: {server.tripwire.panic!r}"
        ) from server.tripwire.panic


class _Server:
    def __init__(
        self,
        milter: Milter,
        spec: SocketSpec,
        listener: trio.SocketListener,
        *,
        io_timeout: float,
        max_connections: int,
        max_data_size: int,
        shutdown_grace: float,
        panic_grace: float,
    ) -> None:
        self.milter = milter
        self.spec = spec
        self.listener = listener
        self.io_timeout = io_timeout
        self.max_data_size = max_data_size
        self.shutdown_grace = shutdown_grace
        self.panic_grace = panic_grace
        self.slots = trio.Semaphore(max_connections)
        self.panicked = trio.Event()
        self.tripwire = Tripwire(on_panic=lambda exc: self.panicked.set())
        self.tripwire.watched = True  # one task checks every connection's I/O timeout
        self.accepting = trio.CancelScope()
        self.root: trio.Nursery | None = None
        self.stopping = False
        self._ids = itertools.count(1)

    async def run(
        self,
        task_status: trio.TaskStatus[object],
        handle_signals: bool,
        shutdown: trio.Event | None,
    ) -> None:
        address = self.listener.socket.getsockname()
        try:
            async with trio.open_nursery() as root:
                self.root = root
                root.start_soon(self._accept_loop)
                root.start_soon(self._after_panic)
                root.start_soon(self._watch_io)
                if handle_signals and threading.current_thread() is threading.main_thread():
                    await root.start(self._watch_signals)
                if shutdown is not None:
                    root.start_soon(self._watch_event, shutdown)
                log.info(
                    "milter %r serving on %s",
                    self.milter.name,
                    describe_address(address, self.spec),
                )
                task_status.started(address)
        except BaseExceptionGroup as group:
            # One failure (an accept error, say) is raised as itself, as documented.
            _, rest = group.split(trio.Cancelled)
            if rest is not None and len(rest.exceptions) == 1:
                only = rest.exceptions[0]
                if not isinstance(only, BaseExceptionGroup):
                    raise only from None
            raise

    # --- accepting -------------------------------------------------------------------

    async def _accept_loop(self) -> None:
        assert self.root is not None
        with self.accepting:
            while True:
                await self.slots.acquire()
                try:
                    stream = await self.listener.accept()
                except OSError as exc:
                    self.slots.release()
                    if exc.errno in _ACCEPT_CAPACITY_ERRNOS:
                        log.error(
                            "accept failed (%s), retrying in %.1f s",
                            os.strerror(exc.errno or 0),
                            _ACCEPT_RETRY_DELAY,
                        )
                        await trio.sleep(_ACCEPT_RETRY_DELAY)
                        continue
                    raise
                except BaseException:
                    self.slots.release()
                    raise
                self.root.start_soon(self._connection, stream, f"#{next(self._ids)}")
        # Stopped accepting: free the address for a restarted server at once.
        await self.listener.aclose()

    async def _connection(self, stream: trio.SocketStream, connection_id: str) -> None:
        try:
            if self.spec.family != "unix":
                # Trio sets it already; the latency of every reply depends on it.
                # A peer that already reset the connection makes it fail (EINVAL
                # on macOS): that must not escape and stop the server.
                with contextlib.suppress(OSError):
                    stream.setsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY, True)
                log.debug("[%s] connection from %s", connection_id, _peer(stream))
            await handle_connection(
                self.milter,
                stream,
                tripwire=self.tripwire,
                connection_id=connection_id,
                io_timeout=self.io_timeout,
                max_data_size=self.max_data_size,
            )
        finally:
            self.slots.release()

    async def _watch_io(self) -> None:
        """The I/O timeout of every connection, from one task (a task per
        connection would cost memory on every idle connection)."""
        period = self.io_timeout / 4
        sessions = self.tripwire.sessions
        while True:
            await trio.sleep(period)
            for session in list(sessions):
                session.io_stalled(period)

    # --- shutting down ---------------------------------------------------------------

    def _cancel_all(self) -> None:
        if self.root is not None:
            self.root.cancel_scope.cancel()

    async def _after_panic(self) -> None:
        await self.panicked.wait()
        self.accepting.cancel()
        log.critical(
            "a handler panicked: stopping (grace %.1f s for running handlers)", self.panic_grace
        )
        with trio.move_on_after(self.panic_grace):
            while self.tripwire.busy:
                await trio.sleep(0.01)
        self._cancel_all()

    async def _drain(self) -> None:
        """Graceful shutdown: let open messages finish, then cancel."""
        if self.stopping:
            return
        self.stopping = True
        self.accepting.cancel()
        self.tripwire.draining = True
        in_flight = self.tripwire.messages_in_flight
        log.info(
            "shutting down: %d message(s) in flight, up to %.1f s grace",
            in_flight,
            self.shutdown_grace,
        )
        with trio.move_on_after(self.shutdown_grace) as scope:
            while self.tripwire.messages_in_flight:
                await trio.sleep(0.02)
        if scope.cancelled_caught:
            log.warning(
                "shutdown grace over with %d message(s) still in flight; closing",
                self.tripwire.messages_in_flight,
            )
        self._cancel_all()

    async def _watch_signals(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if self.stopping:
                    log.warning("%s again: stopping now", name)
                    self._cancel_all()
                    return
                log.info("%s received", name)
                assert self.root is not None
                self.root.start_soon(self._drain)

    async def _watch_event(self, shutdown: trio.Event) -> None:
        await shutdown.wait()
        await self._drain()


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino)


def _peer(stream: trio.SocketStream) -> object:
    try:
        return stream.socket.getpeername()
    except OSError:
        return "?"


__all__ = ["serve"]
