"""The dispatcher: drives one MTA connection from engine events to handler calls to replies.

The engine (``protocol.MilterConnection``) does all protocol work; this module
calls the user's typed handlers through the converters built at decoration
time and turns what they return into the one reply each command owes
(protocol.md §6, SPEC §2.1). It owns no socket: it reads and writes a
``trio.abc.Stream`` handed to it by the server or by the testing client.

Failure semantics (SPEC §2.1), in one place:

- ``Err``, or a `MilterError` raised by a ``Result`` handler: TEMPFAIL, go on;
- a ``str`` argument that is not UTF-8: the handler is not called, TEMPFAIL;
- a status not valid for its stage: TEMPFAIL and an error log;
- anything else escaping a handler (or its background tasks) is a panic: the
  command is answered TEMPFAIL and the `Tripwire` is tripped, after which no
  handler runs anywhere and every owed reply is TEMPFAIL.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from typing_extensions import TypeVarTuple, Unpack

from ._context import Context, Stage
from ._errors import ConnectionLost, MilterError, StageError
from ._handlers import AnyHandler, Returns
from ._milter import Milter
from ._status import Err, Ok, Status
from ._transport import transport_for
from .protocol import (
    ACCEPT,
    CONTINUE,
    DISCARD,
    MAX_DATA_SIZE,
    NEED_DATA,
    NOREPLY_FLAG,
    NOREPLY_OPTS,
    REJECT,
    SKIP,
    TEMPFAIL,
    Actions,
    CommandCode,
    LocalProtocolError,
    MacroStage,
    MilterConnection,
    Modification,
    NegotiationError,
    OptionNegotiation,
    Progress,
    ProtocolOpts,
    RemoteProtocolError,
    Reply,
    ReplyWithCode,
    negotiate,
    negotiate_all,
    offered,
)
from .protocol._state import FINAL_REPLIES

log = logging.getLogger("triomilter")
Ts = TypeVarTuple("Ts")

FLUSH_THRESHOLD = 256 * 1024
"""Queued end-of-message changes are written early past this many bytes."""
CLOSE_GRACE = 1.0
"""Seconds on_abort/on_close may take when a shutdown cancels their connection."""

_MAIL = int(CommandCode.MAIL)
_STAGE_OF_CODE: dict[int, Stage] = {
    CommandCode.CONNECT: Stage.CONNECT,
    CommandCode.HELO: Stage.HELO,
    CommandCode.MAIL: Stage.MAIL,
    CommandCode.RCPT: Stage.RCPT,
    CommandCode.DATA: Stage.DATA,
    CommandCode.HEADER: Stage.HEADER,
    CommandCode.EOH: Stage.EOH,
    CommandCode.BODY: Stage.BODY,
    CommandCode.UNKNOWN: Stage.UNKNOWN,
}

_SIMPLE_REPLIES: dict[Status, Reply] = {
    Status.CONTINUE: CONTINUE,
    Status.ACCEPT: ACCEPT,
    Status.DISCARD: DISCARD,
    Status.SKIP: SKIP,
}


class Tripwire:
    """State shared by every connection of one server: a panic and a drain.

    ``trip`` records the first panic and calls ``on_panic`` (the server uses
    it to start shutting down). ``draining`` is set by a graceful shutdown:
    new messages are then answered TEMPFAIL.
    """

    __slots__ = ("_on_panic", "busy", "draining", "panic", "sessions", "watched")

    def __init__(self, on_panic: Callable[[BaseException], None] | None = None) -> None:
        self.panic: BaseException | None = None
        self.draining = False
        self.busy = 0
        """How many handler calls are running (the panic grace waits for them)."""
        self.sessions: set[Session] = set()
        self.watched = False
        """Whether a server checks every session's I/O timeout (else each its own)."""
        self._on_panic = on_panic

    @property
    def messages_in_flight(self) -> int:
        """How many connections are in the middle of a message."""
        return sum(1 for session in self.sessions if session.conn.in_message)

    def trip(self, exc: BaseException) -> None:
        if self.panic is None:
            self.panic = exc
            if self._on_panic is not None:
                self._on_panic(exc)


class ConnectionTasks:
    """Background tasks of one MTA connection: ``start_soon`` and ``start`` like a nursery.

    Tasks run until they return or the connection ends (then they are
    cancelled). An exception escaping a task is a panic of the milter, caught
    in the task itself: the connection keeps answering (TEMPFAIL) while the
    server shuts down, exactly as for a handler's exception.
    """

    __slots__ = ("_nursery", "_on_panic")

    def __init__(self, nursery: trio.Nursery, on_panic: Callable[[BaseException], None]) -> None:
        self._nursery = nursery
        self._on_panic = on_panic

    def start_soon(
        self,
        async_fn: Callable[[Unpack[Ts]], Awaitable[object]],
        *args: *Ts,
        name: object = None,
    ) -> None:
        """Start ``async_fn(*args)`` in the background."""
        self._nursery.start_soon(self._guard, async_fn, args, name=name or async_fn)

    async def start(
        self, async_fn: Callable[..., Awaitable[object]], *args: object, name: object = None
    ) -> object:
        """Start ``async_fn(*args, task_status=...)`` and wait for its ``started()`` value."""
        return await self._nursery.start(self._guard_start, async_fn, args, name=name or async_fn)

    async def _guard(
        self, async_fn: Callable[..., Awaitable[object]], args: tuple[object, ...]
    ) -> None:
        try:
            await async_fn(*args)
        except ConnectionLost:
            pass  # the connection is ending anyway: not a panic
        except Exception as exc:
            self._on_panic(exc)

    async def _guard_start(
        self,
        async_fn: Callable[..., Awaitable[object]],
        args: tuple[object, ...],
        task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            await async_fn(*args, task_status=task_status)
        except Exception as exc:
            self._on_panic(exc)


class _Closed(Exception):
    """End this connection (already logged)."""


class Session:
    """One MTA connection: the engine, the context and the handlers."""

    def __init__(
        self,
        milter: Milter,
        stream: trio.abc.Stream,
        tripwire: Tripwire,
        connection_id: str,
        io_timeout: float,
        max_data_size: int,
        nursery: trio.Nursery | None,
    ) -> None:
        self.milter = milter
        self.stream = stream
        self.tripwire = tripwire
        self.connection_id = connection_id
        self.io_timeout = io_timeout
        self.tasks = ConnectionTasks(nursery, self._task_panicked) if nursery is not None else None
        self.conn = MilterConnection(max_data_size)
        self.transport = transport_for(stream)
        self._io_scope = trio.CancelScope()
        self._io_last = -1
        self._io_stalled = 0.0
        self.ctx: Context[Any] = Context(self)
        self.stage = Stage.NEGOTIATE
        self.error_reply: bytes | None = None
        self.outbox = bytearray()
        # Set while end-of-message changes are being written: the handler and
        # its background tasks may write at once, and must not interleave.
        self._writing: trio.Event | None = None
        self.requested_macros: dict[MacroStage, bytes] = {}
        self.actions = Actions.NONE
        self.faked_noreply = ProtocolOpts.NONE
        self.open = False  # an SMTP connection is open: on_close is owed
        self._handlers = milter.handlers
        self._commands: dict[int, Callable[[Any], Any]] = {
            CommandCode.OPTNEG: self._negotiate,
            CommandCode.EOM: self._eom,
            CommandCode.ABORT: self._abort,
            CommandCode.QUIT: self._quit,
            CommandCode.QUIT_NC: self._quit_new_connection,
        }

    # --- logging ------------------------------------------------------------------

    def log(self, level: int, message: str, *args: object, exc_info: Any = None) -> None:
        if not log.isEnabledFor(level):
            return
        queue_id = self.conn.macros.get(b"i")
        prefix = f"[{self.connection_id}] "
        if queue_id:
            prefix += f"{queue_id.decode('ascii', 'replace')}: "
        log.log(level, prefix + message, *args, exc_info=exc_info)

    # --- the loop -------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until the MTA quits, it breaks, or we are cancelled."""
        try:
            with self._io_scope:
                await self._loop()
            if self._io_scope.cancelled_caught:
                self.log(
                    logging.WARNING,
                    "no I/O with the MTA for %s s, closing the connection",
                    self.io_timeout,
                )
                await self._connection_lost()
        except _Closed:
            await self._connection_lost()
        except RemoteProtocolError as exc:
            self.log(logging.ERROR, "protocol error, closing the connection: %s", exc)
            await self._connection_lost()
        except trio.BrokenResourceError as exc:
            self.log(logging.WARNING, "connection broken: %s", exc)
            await self._connection_lost()
        except trio.Cancelled:
            # Shutdown (grace over, or serve() cancelled): still run on_abort and
            # on_close, as libmilter does when a session ends, but briefly.
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_GRACE):
                await self._connection_lost()
            raise

    async def _loop(self) -> None:
        conn = self.conn
        commands = self._commands
        handlers = self._handlers
        receive = self.transport.receive
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                data = await receive()
                if not data:
                    if conn.buffered:
                        self.log(
                            logging.ERROR,
                            "the MTA closed the connection in the middle of a packet "
                            "(%d bytes of it received)",
                            conn.buffered,
                        )
                    elif conn.in_message:
                        self.log(logging.WARNING, "the MTA closed the connection mid-message")
                    else:
                        self.log(logging.DEBUG, "the MTA closed the connection without QUIT")
                    raise _Closed
                conn.receive_data(data)
                continue
            code = event.code  # type: ignore[union-attr]
            stage = _STAGE_OF_CODE.get(code)
            if stage is not None:
                self.open = True
                if code == _MAIL and self.tripwire.draining:
                    self.log(logging.INFO, "shutting down: new message answered TEMPFAIL")
                    await self._answer(Status.TEMPFAIL)
                    continue
                status = await self._run(handlers.get(stage), stage, event)
                await self._answer(status)
                continue
            if await commands[code](event):
                return

    # --- calling handlers -------------------------------------------------------------

    async def _run(self, handler: AnyHandler | None, stage: Stage, event: object) -> Status:
        """Call ``handler`` for ``event``; return the status to answer with."""
        self.stage = stage
        # What "no verdict" is here: nothing at all for a NOREPLY stage.
        silent = self.conn.owed is None
        if handler is None:
            return Status.NOREPLY if silent else Status.CONTINUE
        if self.tripwire.panic is not None:
            return Status.NOREPLY if silent else Status.TEMPFAIL
        try:
            args = handler.convert(event)
        except UnicodeDecodeError as exc:
            self.log(
                logging.WARNING,
                "%s: argument is not UTF-8 (%s); handler %s not called, %s "
                "(annotate the parameter as bytes to get raw bytes)",
                stage.value,
                exc.reason,
                handler.__qualname__,
                "nothing to answer (NOREPLY stage)" if silent else "answering TEMPFAIL",
            )
            return Status.NOREPLY if silent else Status.TEMPFAIL
        result: object = await self._call(handler, args)
        return self._status_of(handler, result)

    async def _call(self, handler: AnyHandler, args: tuple[object, ...]) -> object:
        tripwire = self.tripwire
        tripwire.busy += 1
        try:
            result = handler.func(self.ctx, *args)
            if handler.is_async or inspect.isawaitable(result):
                # (also an async callable object, or one behind a plain decorator)
                result = await result  # type: ignore[misc]
            return result
        except ConnectionLost as exc:
            # The MTA went away while a change was written: this connection
            # ends (on_abort/on_close), the milter does not.
            self.log(logging.WARNING, "%s", exc)
            raise _Closed from None
        except MilterError as exc:
            if handler.returns is Returns.RESULT:
                return Err(exc)
            self._panic(handler, exc)
        except Exception as exc:
            self._panic(handler, exc)
        except BaseExceptionGroup as group:
            # A handler's own nursery failing while being cancelled: the
            # failure is a panic, the cancellation goes on.
            cancelled, failures = group.split(trio.Cancelled)
            if failures is None:
                raise
            self._panic(handler, failures)
            if cancelled is not None:
                raise cancelled from None
        finally:
            tripwire.busy -= 1
        return _PANICKED

    def _panic(self, handler: AnyHandler, exc: BaseException) -> None:
        self.log(
            logging.CRITICAL,
            "handler %s panicked; the milter shuts down: %r",
            handler.__qualname__,
            exc,
            exc_info=exc,
        )
        self.tripwire.trip(exc)

    def _task_panicked(self, exc: BaseException) -> None:
        self.log(
            logging.CRITICAL,
            "a background task panicked; the milter shuts down: %r",
            exc,
            exc_info=exc,
        )
        self.tripwire.trip(exc)

    def _status_of(self, handler: AnyHandler, result: object) -> Status:
        if type(result) is Status:
            return result
        if result is _PANICKED:
            return Status.TEMPFAIL
        if isinstance(result, Ok):
            value = result.value
            if type(value) is Status:
                return value
            result = value
        elif isinstance(result, Err):
            self.log(
                logging.WARNING,
                "%s: handler %s returned Err(%s); answering TEMPFAIL",
                self.stage.value,
                handler.__qualname__,
                result.error,
            )
            return Status.TEMPFAIL
        self.log(
            logging.ERROR,
            "%s: handler %s returned %r, not a Status; answering TEMPFAIL",
            self.stage.value,
            handler.__qualname__,
            result,
        )
        return Status.TEMPFAIL

    # --- answering ---------------------------------------------------------------------

    async def _answer(self, status: Status) -> None:
        """Send the reply ``status`` stands for, with anything queued before it."""
        conn = self.conn
        owed = conn.owed
        error_reply = self.error_reply
        self.error_reply = None
        if self.tripwire.panic is not None and status is not Status.NOREPLY:
            status = Status.TEMPFAIL  # after a panic nothing but TEMPFAIL is answered
        if owed is None:
            if status is not Status.NOREPLY:
                self.log(
                    logging.ERROR,
                    "%s: handler returned %s, but this stage negotiated no reply "
                    "(NOREPLY); nothing sent",
                    self.stage.value,
                    status.name,
                )
            return
        reply = _SIMPLE_REPLIES.get(status)
        if reply is None:
            if status is Status.REJECT:
                reply = (
                    ReplyWithCode(error_reply)
                    if error_reply and error_reply[:1] == b"5"
                    else REJECT
                )
            elif status is Status.TEMPFAIL:
                reply = (
                    ReplyWithCode(error_reply)
                    if error_reply and error_reply[:1] == b"4"
                    else TEMPFAIL
                )
            elif status is Status.NOREPLY and self.faked_noreply & NOREPLY_FLAG.get(owed, 0):
                reply = CONTINUE  # the MTA could not skip the reply: libmilter fakes it
        if (
            reply is None
            or reply.code not in FINAL_REPLIES[owed]
            or (
                reply is SKIP and not conn.negotiated.opts & ProtocolOpts.SKIP  # type: ignore[union-attr]
            )
        ):
            self.log(
                logging.ERROR,
                "%s: %s is not a valid status here; answering TEMPFAIL",
                self.stage.value,
                status.name,
            )
            reply = TEMPFAIL
        data = conn.send(reply)
        outbox = self.outbox
        if outbox and owed == CommandCode.EOM and (status is Status.TEMPFAIL or reply is TEMPFAIL):
            outbox.clear()  # the message fails (also by an invalid status): changes are moot
        if self._writing is not None:
            # Changes are still being written (by a background task, say): after them.
            outbox += data
            await self._flush()
            return
        if outbox:
            outbox += data
            data = bytes(outbox)
            outbox.clear()
        await self._send(data)

    async def _send(self, data: bytes) -> None:
        await self.transport.send(data)

    async def _flush(self) -> None:
        """Write the outbox, one write at a time, in the order it was queued."""
        while self._writing is not None:
            await self._writing.wait()
        if not self.outbox:
            return  # a write that waited with us took it
        data = bytes(self.outbox)
        self.outbox.clear()
        self._writing = done = trio.Event()
        try:
            await self.transport.send(data)
        finally:
            self._writing = None
            done.set()

    def io_stalled(self, period: float) -> bool:
        """Count ``period`` seconds against the I/O timeout; True once it ran out.

        Called every quarter of the timeout (by `watchdog`, or for every
        connection at once by the server) instead of arming a cancel scope
        per read and write (measured: that doubled the cost of a round trip).
        A connection that waited on the same read or write for the whole
        timeout is cancelled.
        """
        transport = self.transport
        if transport.waiting and transport.io_count == self._io_last:
            self._io_stalled += period
            if self._io_stalled >= self.io_timeout:
                self._io_scope.cancel()
                return True
        else:
            self._io_stalled = 0.0
            self._io_last = transport.io_count
        return False

    async def watchdog(self) -> None:
        """The I/O timeout of a connection served without a server (tests)."""
        period = self.io_timeout / 4
        while True:
            await trio.sleep(period)
            if self.io_stalled(period):
                return

    async def queue(self, reply: Modification | Progress, flush: bool = False) -> None:
        """Queue an end-of-message change (already validated by the context API)."""
        try:
            self.outbox += self.conn.send(reply)
        except LocalProtocolError as exc:
            raise StageError(str(exc)) from None
        if flush or len(self.outbox) > FLUSH_THRESHOLD:
            try:
                await self._flush()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ConnectionLost(f"the MTA connection is gone: {exc}") from exc

    @property
    def panicked(self) -> bool:
        """Whether a handler panicked anywhere: then no change may be sent."""
        return self.tripwire.panic is not None

    # --- special commands --------------------------------------------------------------

    async def _negotiate(self, offer: OptionNegotiation) -> bool:
        self.stage = Stage.NEGOTIATE
        milter = self.milter
        handler = self._handlers.get(Stage.NEGOTIATE)
        try:
            if handler is None or self.tripwire.panic is not None:
                macros = {stage: names.encode() for stage, names in milter.macros.items()}
                negotiated = negotiate(
                    offer,
                    self._with_macro_action(offer, milter.actions, macros),
                    milter.protocol_opts | milter.unhandled_steps,
                    macros,
                )
            else:
                negotiated = await self._negotiate_with(handler, offer)
        except NegotiationError as exc:
            self.log(logging.ERROR, "negotiation failed, closing the connection: %s", exc)
            raise _Closed from None
        self.actions = negotiated.actions
        self.faked_noreply = negotiated.faked_noreply
        self.error_reply = None  # no reply is built from negotiation: nothing may leak
        self.open = True
        await self._send(self.conn.accept_negotiation(negotiated))
        self.log(
            logging.DEBUG,
            "negotiated actions=%r opts=%r",
            negotiated.actions,
            negotiated.opts,
        )
        return False

    async def _negotiate_with(self, handler: AnyHandler, offer: OptionNegotiation) -> Any:
        mta_actions, mta_opts = offered(offer)
        # libmilter shows the NOREPLY_* steps it can fake as offered.
        result = await self._call(handler, (mta_actions, mta_opts | NOREPLY_OPTS))
        if isinstance(result, Ok):
            result = result.value
        if result is _PANICKED:
            raise _Closed
        if isinstance(result, Err):
            self.log(logging.ERROR, "on_negotiate returned Err(%s); closing", result.error)
            raise _Closed
        if not (isinstance(result, tuple) and len(result) == 3 and type(result[0]) is Status):
            self.log(
                logging.ERROR,
                "on_negotiate returned %r, not (Status, Actions, ProtocolOpts)",
                result,
            )
            raise _Closed
        status, actions, opts = result
        macros = self.requested_macros
        if status is Status.ALL_OPTS:
            return negotiate_all(offer, self.milter.unhandled_steps, macros)
        if status is Status.CONTINUE:
            actions = self._with_macro_action(offer, Actions(actions), macros)
            return negotiate(offer, actions, ProtocolOpts(opts), macros)
        self.log(
            logging.INFO, "on_negotiate answered %s: not filtering this connection", status.name
        )
        raise _Closed

    @staticmethod
    def _with_macro_action(offer: OptionNegotiation, actions: Actions, macros: object) -> Actions:
        # libmilter's API rule: macro lists need SETSYMLIST (MTAs do not check it).
        if macros and offered(offer)[0] & Actions.REQUEST_MACROS:
            return actions | Actions.REQUEST_MACROS
        return actions

    async def _eom(self, event: Any) -> bool:
        if event.chunk:
            # libmilter delivers data in EOM as a last body chunk.
            status = await self._run(self._handlers.get(Stage.BODY), Stage.BODY, event)
            if status not in (Status.CONTINUE, Status.NOREPLY, Status.SKIP):
                await self._answer(status)
                return False
        status = await self._run(self._handlers.get(Stage.EOM), Stage.EOM, event)
        await self._answer(status)
        return False

    async def _abort(self, event: object) -> bool:
        self.error_reply = None
        await self._run_ignored(Stage.ABORT)
        return False

    async def _quit(self, event: object) -> bool:
        await self._close()
        return True

    async def _quit_new_connection(self, event: object) -> bool:
        await self._close()
        return False

    async def _close(self) -> None:
        if self.open:
            self.open = False
            await self._run_ignored(Stage.CLOSE)
        self.ctx.data = None
        self.error_reply = None

    async def _run_ignored(self, stage: Stage) -> None:
        """Run on_abort/on_close: results are ignored, panics still count."""
        handler = self._handlers.get(stage)
        if handler is None or self.tripwire.panic is not None:
            return
        self.stage = stage
        result = await self._call(handler, ())
        self.error_reply = None  # no reply follows: a reply set here must not leak to the next
        if isinstance(result, Err):
            self.log(logging.WARNING, "on_%s returned Err(%s)", stage.value, result.error)

    async def _connection_lost(self) -> None:
        """The connection ended without QUIT: abort and close like libmilter."""
        if self.conn.in_message:
            await self._run_ignored(Stage.ABORT)
        await self._close()


_PANICKED = object()


async def handle_connection(
    milter: Milter,
    stream: trio.abc.Stream,
    *,
    tripwire: Tripwire | None = None,
    connection_id: str = "-",
    io_timeout: float = 7210.0,
    max_data_size: int = MAX_DATA_SIZE,
) -> None:
    """Serve one MTA connection on ``stream`` until it ends; close the stream.

    Background tasks started through ``ctx.connection_nursery`` are cancelled
    when the connection ends; an exception escaping one is a panic.
    """
    tripwire = tripwire if tripwire is not None else Tripwire()
    if io_timeout <= 0 or math.isnan(io_timeout):
        raise ValueError(f"io_timeout must be positive, got {io_timeout}")
    try:
        async with trio.open_nursery() as nursery:
            session = Session(
                milter, stream, tripwire, connection_id, io_timeout, max_data_size, nursery
            )
            tripwire.sessions.add(session)
            if not tripwire.watched:
                nursery.start_soon(session.watchdog)
            try:
                await session.run()
            except Exception as exc:
                # A bug of ours, not the handler's: this connection alone ends.
                log.error(
                    "[%s] internal error, closing the connection: %r",
                    connection_id,
                    exc,
                    exc_info=exc,
                )
            finally:
                tripwire.sessions.discard(session)
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await stream.aclose()
