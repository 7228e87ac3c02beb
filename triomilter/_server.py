"""`serve_listener()` and `serve()`: the Trio server running a `Milter` (SPEC §2.1, §2.4, §3).

One nursery per connection runs the dispatcher on the socket stream; this
module knows listeners, limits, signals and shutdown, and no packet layouts.
``serve`` is ``open_listener`` + ``serve_listener``, like trio's ``serve_tcp``.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import itertools
import logging
import os
import resource
import signal
import threading
from collections.abc import Sequence
from typing import Any

import attrs
import trio
from typing_extensions import Unpack

from ._errors import ForcedShutdown, MilterPanic
from ._metrics import Metrics
from ._milter import Milter
from ._options import Limits, ServerOptions, ServerOptionsKwargs
from ._session import ServerState, refuse_connection, serve_connection
from ._sockets import describe_address, open_listener, parse_socket_spec
from ._systemd import Notifier
from ._transport import close_stream

log = logging.getLogger("triomilter")

# Errors that mean "out of resources, try again later" (trio's serve_listeners).
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_ACCEPT_RETRY_DELAY = 0.1
_REFUSING_AT_ONCE = 64
"""Over-limit connections answered at the same time; beyond, they are closed at once."""
_STATUS_EVERY = 5.0
"""Seconds between two ``STATUS=`` updates to systemd (when they changed)."""
_SPARE_DESCRIPTORS = 64
"""Descriptors kept beside the connections (listener, threads' pipes, logs...)."""


async def serve_listener(
    milter: Milter[Any, Any],
    listener: trio.abc.Listener[trio.abc.Stream] | Sequence[trio.abc.Listener[trio.abc.Stream]],
    options: ServerOptions | None = None,
    *,
    task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED,
    shutdown: trio.Event | None = None,
    metrics: Metrics | None = None,
) -> None:
    """Serve ``milter`` on an already open ``listener`` until cancelled, shut down or a panic.

    For a listener opened elsewhere: by systemd (socket activation), by a
    parent process (descriptor passing), by a test; several listeners (a
    sequence) share one server. With ``nursery.start(serve_listener, ...)``
    the bound address is reported (the ``getsockname()`` of the first
    listener if it is a `trio.SocketListener`, else None). ``options`` are
    the server's `ServerOptions` (the defaults if None); ``metrics``, if
    given, counts what the server does (`Metrics`).

    Under systemd (``Type=notify``, ``NOTIFY_SOCKET`` set) it tells systemd
    ``READY=1`` once listening, its connections and messages in ``STATUS=``,
    ``STOPPING=1`` when draining, and, with ``WatchdogSec=``, ``WATCHDOG=1``
    from the event loop every half watchdog period.

    Shutdown:

    - Graceful: on SIGTERM/SIGINT (when ``options.handle_signals`` and
      running in the main thread) or when ``shutdown`` is set: stop
      accepting, answer new messages TEMPFAIL, let connections finish the
      message they are in for up to ``shutdown_grace`` seconds, then cancel
      every connection and return. A second signal stops at once and raises
      `ForcedShutdown`.
    - Panic (SPEC §2.1): the panicking command is answered TEMPFAIL; from then
      on no handler runs and every owed reply is TEMPFAIL; the listener
      closes; handlers still running get up to ``panic_grace`` seconds; then
      every connection is cancelled and `MilterPanic` is raised with the
      handler's exception as ``__cause__``. ``on_abort``/``on_close`` do not run.
    - Cancellation from outside stops at once.

    Resource handling: the cyclic garbage collector is tuned for a server
    (less frequent collections; what was loaded before is frozen), unless
    the process set its own thresholds. The listener is ours once passed in
    and is closed when accepting stops (so that a successor can bind the address at once).
    ``max_connections`` connections are served at once; one more is still
    accepted, answered TEMPFAIL at connect and closed (a rate-limited
    warning says so), so the MTA never waits on a silent socket. The soft
    limit of open files is raised to fit ``max_connections`` if the hard
    limit allows, else a warning says how many fit.

    Error handling: a connection's protocol error, timeout or disconnect ends
    that connection only (after ``on_abort``/``on_close``) with one log line;
    accept errors meaning "out of file descriptors or memory" are logged once
    per episode and retried every 100 ms; other accept errors propagate.
    """
    options = options if options is not None else ServerOptions()
    listeners = [listener] if isinstance(listener, trio.abc.Listener) else list(listener)
    if not listeners:
        raise ValueError("serve_listener needs at least one listener")
    _fit_descriptors(options.max_connections)
    _tune_gc()
    server = _Server(milter, listeners, options, metrics)
    try:
        await server.run(task_status, shutdown)
    finally:
        with trio.CancelScope(shield=True):
            for one in listeners:
                await one.aclose()
    if server.state.panic is not None:
        raise MilterPanic(
            f"milter {milter.name!r} shut down after a handler panicked: {server.state.panic!r}"
        ) from server.state.panic
    if server.forced is not None:
        raise ForcedShutdown(server.forced)


async def serve(
    milter: Milter[Any, Any],
    socket: str,
    options: ServerOptions | None = None,
    *,
    task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED,
    shutdown: trio.Event | None = None,
    metrics: Metrics | None = None,
    **overrides: Unpack[ServerOptionsKwargs],
) -> None:
    """Serve ``milter`` on ``socket`` (``inet:PORT@HOST``, ``inet6:PORT@HOST``, ``unix:/path``).

    ``serve_listener`` on a listener opened from the spec: see it for the
    shutdown, panic and error semantics. Options are a `ServerOptions`, or
    its fields as keyword arguments (``io_timeout=60``), which override
    ``options``. With ``nursery.start(serve, ...)`` the bound address is
    reported (a ``(host, port)`` tuple for inet, ``(host, port, flowinfo,
    scope_id)`` for inet6, the path for unix), so port 0 works.

    Bad socket specs raise ``SocketSpecError`` (a ``ValueError``) and bad
    options ``ValueError``/``TypeError``, before anything is bound. A UNIX
    socket file is removed on exit if it is still ours (a successor may have
    replaced it while we drained).
    """
    options = options if options is not None else ServerOptions()
    if overrides:
        options = attrs.evolve(options, **overrides)
    spec = parse_socket_spec(socket)
    listener = await open_listener(
        spec,
        backlog=options.backlog,
        reuse_port=options.reuse_port,
        remove_stale_socket=options.remove_stale_socket,
        socket_mode=options.socket_mode,
    )
    socket_file = _file_id(spec.path) if spec.path else None
    try:
        await serve_listener(
            milter, listener, options, task_status=task_status, shutdown=shutdown, metrics=metrics
        )
    finally:
        with trio.CancelScope(shield=True):
            await listener.aclose()
        if socket_file is not None and _file_id(spec.path) == socket_file:
            with contextlib.suppress(OSError):
                os.unlink(spec.path)


class _Server:
    def __init__(
        self,
        milter: Milter[Any, Any],
        listeners: list[trio.abc.Listener[trio.abc.Stream]],
        options: ServerOptions,
        metrics: Metrics | None,
    ) -> None:
        self.milter = milter
        self.listeners = listeners
        self.options = options
        self.limits: Limits = options.limits_for(milter)
        self.panicked = trio.Event()
        self.state = ServerState(
            on_panic=lambda exc: self.panicked.set(),
            thread_limit=options.thread_limit,
            metrics=metrics,
        )
        self.notifier = Notifier.from_environment()
        self.state.watched = True  # one task checks every connection's I/O deadline
        self.accepting = trio.CancelScope()
        self.root: trio.Nursery | None = None
        self.stopping = False
        self.forced: int | None = None
        self.open_connections = 0
        self.refusing = 0
        self.refused = 0  # over the limit, in this episode
        self._ids = itertools.count(1)

    async def run(self, task_status: trio.TaskStatus[object], shutdown: trio.Event | None) -> None:
        address = _address_of(self.listeners[0])
        try:
            async with trio.open_nursery() as root:
                self.root = root
                for listener in self.listeners:
                    root.start_soon(self._accept_loop, listener)
                root.start_soon(self._after_panic)
                root.start_soon(self._watch_io)
                if (
                    self.options.handle_signals
                    and threading.current_thread() is threading.main_thread()
                ):
                    await root.start(self._watch_signals)
                if shutdown is not None:
                    root.start_soon(self._watch_event, shutdown)
                where = ", ".join(describe_address(_address_of(one)) for one in self.listeners)
                log.info("milter %r serving on %s", self.milter.name, where)
                if self.notifier is not None:
                    self.notifier.send("READY=1", f"STATUS=serving on {where}")
                    root.start_soon(self._notify_systemd)
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

    async def _accept_loop(self, listener: trio.abc.Listener[trio.abc.Stream]) -> None:
        assert self.root is not None
        failed = 0
        since = 0.0
        with self.accepting:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    if not failed:
                        since = trio.current_time()
                        log.error(
                            "accept failed (%s); retrying every %.1f s until it works",
                            os.strerror(exc.errno or 0),
                            _ACCEPT_RETRY_DELAY,
                        )
                    failed += 1
                    await trio.sleep(_ACCEPT_RETRY_DELAY)
                    continue
                if failed:
                    log.warning(
                        "accepting again after %d failed attempt(s) over %.1f s",
                        failed,
                        trio.current_time() - since,
                    )
                    failed = 0
                connection_id = f"#{next(self._ids)}"
                if self.open_connections >= self.options.max_connections:
                    self._refuse(stream, connection_id)
                    continue
                self.open_connections += 1
                self.root.start_soon(self._connection, stream, connection_id)
        # Stopped accepting: free the address for a restarted server at once.
        with trio.CancelScope(shield=True):
            await listener.aclose()

    async def _connection(self, stream: trio.abc.Stream, connection_id: str) -> None:
        try:
            # TCP_NODELAY, on which the latency of every reply depends, is set
            # by trio.SocketStream itself (setting it again cost 0.6 % of W3).
            if log.isEnabledFor(logging.DEBUG) and isinstance(stream, trio.SocketStream):
                log.debug("[%s] connection from %s", connection_id, _peer(stream))
            await serve_connection(
                self.milter, stream, self.state, self.limits, connection_id, self.root
            )
        finally:
            self.open_connections -= 1
            if self.refused and self.open_connections < self.options.max_connections:
                log.info(
                    "below the connection limit again; %d connection(s) were answered TEMPFAIL",
                    self.refused,
                )
                self.refused = 0

    def _refuse(self, stream: trio.abc.Stream, connection_id: str) -> None:
        """No room for ``stream``: answer it TEMPFAIL (or close it), and say so once."""
        assert self.root is not None
        if self.state.metrics is not None:
            self.state.metrics.connection_limit_hit()
        if not self.refused:
            log.warning(
                "connection limit of %d reached (--max-connections): new MTA connections "
                "are answered TEMPFAIL until one ends",
                self.options.max_connections,
            )
        self.refused += 1
        if self.refusing >= _REFUSING_AT_ONCE:
            self.root.start_soon(close_stream, stream)
            return
        self.refusing += 1
        self.root.start_soon(self._refusal, stream, connection_id)

    async def _refusal(self, stream: trio.abc.Stream, connection_id: str) -> None:
        try:
            await refuse_connection(stream, connection_id)
        finally:
            self.refusing -= 1

    async def _watch_io(self) -> None:
        """The I/O deadline of every connection, from one task (a task per
        connection would cost memory on every idle connection)."""
        period = self.limits.io_timeout / 20
        sessions = self.state.sessions
        while True:
            await trio.sleep(period)
            now = trio.current_time()
            for session in list(sessions):
                session.io.check(session.transport, session.conn, now)

    # --- shutting down ---------------------------------------------------------------

    def _cancel_all(self) -> None:
        if self.root is not None:
            self.root.cancel_scope.cancel()

    async def _after_panic(self) -> None:
        await self.panicked.wait()
        self.accepting.cancel()
        if self.notifier is not None:
            self.notifier.send("STOPPING=1", "STATUS=stopping after a handler panicked")
        grace = self.options.panic_grace
        log.critical("a handler panicked: stopping (grace %.1f s for running handlers)", grace)
        with trio.move_on_after(grace):
            await self.state.wait_for_calls()
        self._cancel_all()

    async def _drain(self) -> None:
        """Graceful shutdown: let open messages finish, then cancel."""
        if self.stopping:
            return
        self.stopping = True
        self.accepting.cancel()
        if self.notifier is not None:
            self.notifier.send("STOPPING=1", "STATUS=draining")
        grace = self.options.shutdown_grace
        log.info(
            "shutting down: %d message(s) in flight, up to %.1f s grace",
            self.state.messages_in_flight,
            grace,
        )
        with trio.move_on_after(grace) as scope:
            await self.state.drain()
        if scope.cancelled_caught:
            log.warning(
                "shutdown grace over with %d message(s) still in flight; closing",
                self.state.messages_in_flight,
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
                    self.forced = signum
                    self._cancel_all()
                    return
                log.info("%s received", name)
                assert self.root is not None
                self.root.start_soon(self._drain)

    async def _notify_systemd(self) -> None:
        """``WATCHDOG=1`` from the event loop, and the connections in ``STATUS=``."""
        assert self.notifier is not None
        interval = self.notifier.watchdog_interval
        period = min(interval, _STATUS_EVERY) if interval else _STATUS_EVERY
        last = ""
        while True:
            await trio.sleep(period)
            lines = ["WATCHDOG=1"] if interval else []
            status = (
                f"STATUS={len(self.state.sessions)} connection(s), "
                f"{self.state.messages_in_flight} message(s) in progress"
            )
            if status != last and not self.stopping:
                lines.append(status)
                last = status
            if lines:
                self.notifier.send(*lines)

    async def _watch_event(self, shutdown: trio.Event) -> None:
        await shutdown.wait()
        await self._drain()


def _tune_gc() -> None:
    """Collect a server's large, long-lived heap less often.

    Every command allocates a few short-lived objects; with Python's default
    thresholds the cyclic collector then runs a young collection every few
    messages and, with thousands of connections alive, older collections that
    walk all of them (measured: W1 with 1,000 connections, user CPU per
    message 455 -> 330 us). What was loaded before serving (modules, the milter)
    is frozen out of every collection. Left alone if the process already
    chose its own thresholds.
    """
    if gc.get_threshold()[0] == 700:  # Python's default
        gc.freeze()
        gc.set_threshold(10_000, 50, 50)


def _fit_descriptors(max_connections: int) -> None:
    """Raise the soft limit of open files to fit the connections, if the hard one allows."""
    needed = max_connections + _SPARE_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    wanted = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if wanted > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
    if soft < needed:
        log.warning(
            "only %d open files allowed (RLIMIT_NOFILE, hard limit %s): about %d connections "
            "fit, fewer than --max-connections %d; raise LimitNOFILE / ulimit -n",
            soft,
            "unlimited" if hard == resource.RLIM_INFINITY else hard,
            max(soft - _SPARE_DESCRIPTORS, 0),
            max_connections,
        )


def _address_of(listener: trio.abc.Listener[trio.abc.Stream]) -> object:
    if isinstance(listener, trio.SocketListener):
        return listener.socket.getsockname()
    return None


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


__all__ = ["serve", "serve_listener"]
