"""The dispatcher: one MTA connection, from engine events to handler calls to replies.

The engine (``protocol.MilterConnection``) does all protocol work. A
`Session` reads a command, calls one handler (`_calls.call`: deadlines,
failures, panics), and writes the one reply the command owes
(`reply_for`); around that loop it keeps the connection's lifecycle:
negotiation (`Milter.negotiate`), aborts, ``on_close`` once per SMTP
connection, per-connection and per-message data, and the I/O deadline.
It owns no socket: it reads and writes a ``trio.abc.Stream`` handed to it by
the server or by the testing client.

`ServerState` is what all connections of one server share: a panic, a
graceful drain, the registry of sessions, the worker-thread limiter.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ._calls import FAILED, PANICKED, ConnectionEnded, SlowCall, call
from ._context import Context
from ._errors import ConnectionLost, StageError
from ._handlers import AnyHandler, Returns
from ._metrics import Metrics
from ._milter import Milter
from ._options import Limits, ServerOptions
from ._stage import STAGE_OF_COMMAND, Stage
from ._status import Err, Ok, Status, reply_for
from ._tasks import ConnectionTasks
from ._transport import IoDeadline, WriteQueue, close_stream, transport_for
from .protocol import (
    CONTINUE,
    NEED_DATA,
    NOREPLY_FLAG,
    NOREPLY_OPTS,
    PROGRESS,
    TEMPFAIL,
    Actions,
    CommandCode,
    LocalProtocolError,
    MacroStage,
    MilterConnection,
    Modification,
    Negotiated,
    NegotiationError,
    OptionNegotiation,
    Progress,
    RemoteProtocolError,
    State,
    offered,
)

log = logging.getLogger("triomilter")

CLOSE_GRACE = 1.0
"""Seconds on_abort/on_close may take when a shutdown cancels their connection."""
REFUSAL_TIMEOUT = 10.0
"""Seconds a connection refused for lack of room may take to be answered."""
STALL_REPORT_EVERY = 60.0
"""Seconds between two stall warnings about one handler (the rest are counted)."""

_MAIL = int(CommandCode.MAIL)
_EOM = int(CommandCode.EOM)
_OPTNEG = int(CommandCode.OPTNEG)
_LATER = "TEMPFAIL at the next reply instead (this stage answers nothing)"
_REFUSALS = frozenset({Status.REJECT, Status.TEMPFAIL, Status.DISCARD})
_GOING_ON = frozenset({Status.CONTINUE, Status.ACCEPT, Status.SKIP, Status.NOREPLY})
# A failure here spoils every message of the connection, not only the next.
_CONNECTION_STAGES = frozenset({Stage.CONNECT, Stage.HELO})


class ServerState:
    """What every connection of one server shares.

    - ``panic``: the first handler exception that was a panic (`trip`);
    - ``draining``: a graceful shutdown is under way (new messages TEMPFAIL);
    - ``sessions``: the connections being served (for the I/O deadline and
      the drain);
    - handler calls that wait, counted so that a panic can give them a grace;
    - ``thread_limiter``: bounds the worker threads of ``@blocking`` handlers.
    """

    __slots__ = (
        "_calls_done",
        "_drained",
        "_in_message",
        "_on_panic",
        "_stalls",
        "calls",
        "draining",
        "metrics",
        "panic",
        "sessions",
        "thread_limiter",
        "watched",
    )

    def __init__(
        self,
        on_panic: Callable[[BaseException], None] | None = None,
        *,
        thread_limit: int = 16,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics
        """What the server counts, if anything (`Metrics`)."""
        self.panic: BaseException | None = None
        self.draining = False
        self.sessions: set[Session] = set()
        self.watched = False
        """Whether a server checks every session's I/O deadline (else each its own)."""
        self.calls = 0
        """Handler calls that wait (for I/O, a thread...), running now."""
        self.thread_limiter = trio.CapacityLimiter(thread_limit)
        self._on_panic = on_panic
        self._calls_done: trio.Event | None = None
        self._drained: trio.Event | None = None
        self._in_message: set[Session] = set()
        self._stalls: dict[str, tuple[float, int]] = {}

    def trip(self, exc: BaseException) -> None:
        """Record a panic (the first one counts) and tell the server."""
        if self.metrics is not None:
            self.metrics.panicked()
        if self.panic is None:
            self.panic = exc
            if self._on_panic is not None:
                self._on_panic(exc)

    # --- handler calls that wait ---------------------------------------------------

    def call_started(self) -> None:
        self.calls += 1

    def call_ended(self) -> None:
        self.calls -= 1
        if not self.calls and self._calls_done is not None:
            self._calls_done.set()

    async def wait_for_calls(self) -> None:
        """Return once no handler call is running."""
        if self.calls:
            self._calls_done = trio.Event()
            await self._calls_done.wait()

    # --- graceful drain ------------------------------------------------------------------

    @property
    def messages_in_flight(self) -> int:
        """How many connections are in the middle of a message."""
        if self.draining:
            return len(self._in_message)
        return sum(1 for session in self.sessions if session.conn.in_message)

    async def drain(self) -> None:
        """Answer new messages TEMPFAIL; return once no connection is in a message."""
        self.draining = True
        self._in_message = {s for s in self.sessions if s.conn.in_message}
        if self._in_message:
            self._drained = trio.Event()
            await self._drained.wait()

    def left_message(self, session: Session) -> None:
        """``session`` is between messages (or gone) during a drain."""
        self._in_message.discard(session)
        if not self._in_message and self._drained is not None:
            self._drained.set()

    # --- reports ---------------------------------------------------------------------------

    def stalled(self, session: Session, handler: AnyHandler, held: float) -> None:
        """A handler held the event loop ``held`` seconds: warn, at most once a minute each."""
        if self.metrics is not None:
            self.metrics.loop_stalled()
        name = handler.__qualname__
        now = time.monotonic()
        last, suppressed = self._stalls.get(name, (-STALL_REPORT_EVERY, 0))
        if now - last < STALL_REPORT_EVERY:
            self._stalls[name] = (last, suppressed + 1)
            return
        self._stalls[name] = (now, 0)
        more = f" ({suppressed} more since the last warning)" if suppressed else ""
        session.log(
            logging.WARNING,
            "%s: handler %s held the event loop for %.0f ms%s; every other connection "
            "waited meanwhile: await slow work, or mark a plain def @blocking",
            session.stage.value,
            name,
            held * 1000,
            more,
            event="stall",
        )

    def timed_out(self, session: Session, handler: AnyHandler) -> None:
        """A handler ran past its deadline (already logged)."""
        if self.metrics is not None:
            self.metrics.handler_timed_out(handler.stage)


class Session:
    """One MTA connection: read a command, call one handler, write one reply.

    Also what a handler's `Context` talks to (a `ContextHost`).
    """

    __slots__ = (
        "actions",
        "call_scope",
        "close_owed",
        "conn",
        "connection_id",
        "ctx",
        "ended",
        "error_reply",
        "handlers",
        "io",
        "limits",
        "lost",
        "made_data",
        "metrics",
        "milter",
        "negotiated",
        "nursery",
        "requested_macros",
        "slow_call",
        "stage",
        "stall_warning",
        "state",
        "tasks",
        "transport",
        "writes",
    )

    def __init__(
        self,
        milter: Milter[Any, Any],
        stream: trio.abc.Stream,
        state: ServerState,
        limits: Limits,
        connection_id: str,
        nursery: trio.Nursery,
    ) -> None:
        self.milter = milter
        self.handlers = milter.handlers
        self.state = state
        self.metrics = state.metrics
        self.limits = limits
        self.stall_warning = limits.stall_warning
        self.connection_id = connection_id
        self.nursery = nursery
        self.conn = MilterConnection(limits.max_data_size)
        self.transport = transport_for(stream)
        self.writes = WriteQueue(self.transport)
        self.io = IoDeadline(limits.io_timeout)
        self.tasks: ConnectionTasks | None = ConnectionTasks(nursery, self._task_panicked)
        self.ctx: Context[Any, Any] = Context(self, milter.message_data)
        self.stage = Stage.NEGOTIATE
        self.error_reply: bytes | None = None
        self.requested_macros: dict[MacroStage, bytes] = {}
        self.negotiated: Negotiated | None = None
        self.actions = Actions.NONE
        self.close_owed = False
        """An SMTP connection began and on_close has not run for it yet."""
        self.call_scope = trio.CancelScope()
        """Every handler call runs inside it; a call that waits gives it its deadline."""
        self.slow_call: SlowCall | None = None
        self.lost: Stage | None = None
        self.made_data: object = None
        """The connection data the factory made: ours to close."""
        """A stage that answers nothing failed: what it could not refuse, a later reply must."""
        self.ended = False
        self.ctx.data = self._new_connection_data()  # last: a failing factory logs with all set

    # --- what the context needs (ContextHost) ---------------------------------------

    @property
    def in_message(self) -> bool:
        return self.conn.in_message

    @property
    def panicked(self) -> bool:
        return self.state.panic is not None

    def macro(self, name: bytes) -> bytes | None:
        return self.conn.macros.get(name)

    async def queue(self, change: Modification | Progress, flush: bool = False) -> None:
        """Queue an end-of-message change (already validated by the context API)."""
        try:
            data = self.conn.send(change)
        except LocalProtocolError as exc:
            raise StageError(str(exc)) from None
        if self.writes.add(data) or flush:
            try:
                await self.writes.flush()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ConnectionLost(f"the MTA connection is gone: {exc}") from exc

    async def progress(self) -> None:
        """Send progress now (a slow end of message is still at work)."""
        await self.queue(PROGRESS, flush=True)

    def start_watcher(self, async_fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run ``async_fn(*args)`` beside a handler call (it stops itself)."""
        self.nursery.start_soon(async_fn, *args)

    # --- logging ------------------------------------------------------------------

    def log(
        self,
        level: int,
        message: str,
        *args: object,
        event: str | None = None,
        exc_info: Any = None,
    ) -> None:
        """Log about this connection: its id and queue id in front, and as fields.

        ``event`` names what happened, for machines (``--log-format json``).
        """
        if not log.isEnabledFor(level):
            return
        raw_id = self.conn.macros.get(b"i")
        queue_id = raw_id.decode("ascii", "replace") if raw_id else None
        text = message % args if args else message
        prefix = f"[{self.connection_id}] {queue_id}: " if queue_id else f"[{self.connection_id}] "
        log.log(
            level,
            "%s%s",
            prefix,
            text,
            exc_info=exc_info,
            extra={
                "connection_id": self.connection_id,
                "queue_id": queue_id,
                "stage": self.stage.value,
                "event": event,
                "detail": text,
            },
        )

    # --- the loop -------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until the MTA quits, it breaks, or we are cancelled."""
        try:
            while await self._serve():
                pass
        except ConnectionEnded:
            await self._connection_lost()
        except RemoteProtocolError as exc:
            self.log(
                logging.ERROR,
                "protocol error, closing the connection: %s",
                exc,
                event="protocol_error",
            )
            if self.metrics is not None:
                self.metrics.protocol_error()
            await self._connection_lost()
        except trio.BrokenResourceError as exc:
            self.log(logging.WARNING, "connection broken: %s", exc, event="connection_broken")
            await self._connection_lost()
        except trio.Cancelled:
            # Shutdown (grace over, or serve() cancelled): still run on_abort and
            # on_close, as libmilter does when a session ends, but briefly.
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_GRACE):
                await self._connection_lost()
            raise

    async def _serve(self) -> bool:
        """Run the loop in a fresh call scope; True to go on after a handler was cancelled.

        One scope per connection, not per call (entering a cancel scope costs
        half a round trip): a handler that waits sets its deadline, and
        when it fires the cancellation lands here, with the command still
        owed in the engine.
        """
        with trio.CancelScope() as self.call_scope:
            self.io.scope = self.call_scope  # one scope per connection for both deadlines
            await self._loop()
            return False
        return await self._call_cancelled()

    async def _call_cancelled(self) -> bool:
        """A deadline passed (I/O, a handler's) or the MTA hung up: answer, or end."""
        if self.io.reason is not None:
            self.log(
                logging.WARNING,
                "%s; closing the connection",
                self.io.reason,
                event="io_timeout",
            )
            raise ConnectionEnded
        call = self.slow_call
        self.slow_call = None
        assert call is not None
        elapsed = trio.current_time() - call.started
        if call.hangup is not None:
            self.log(
                logging.WARNING,
                "%s: %s while handler %s ran (%.1f s); it was cancelled",
                call.stage.value,
                call.hangup,
                call.handler.__qualname__,
                elapsed,
                event="mta_hangup",
            )
            raise ConnectionEnded
        self.log(
            logging.WARNING,
            "%s: handler %s did not return within %g s (%.1f s); cancelled, %s",
            call.stage.value,
            call.handler.__qualname__,
            call.timeout,
            elapsed,
            "answering TEMPFAIL"
            if self.conn.owed is not None
            else "going on"
            if call.stage in (Stage.ABORT, Stage.CLOSE)
            else _LATER,
            event="handler_timeout",
        )
        self.state.timed_out(self, call.handler)
        owed = self.conn.owed
        if owed is None and call.stage not in (Stage.ABORT, Stage.CLOSE):
            self.stage = call.stage
            self._failure(True)
        if owed == CommandCode.OPTNEG:
            raise ConnectionEnded  # nothing to answer a negotiation with but the negotiation
        if owed is not None:
            self.stage = call.stage
            await self._answer(Status.TEMPFAIL)
        return self.conn.state is not State.CLOSED

    async def _loop(self) -> None:
        conn = self.conn
        handlers = self.handlers
        receive = self.transport.receive
        state = self.state
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                if state.draining and not conn.in_message:
                    state.left_message(self)
                data = await receive()
                if not data:
                    self._log_eof()
                    raise ConnectionEnded
                conn.receive_data(data)
                continue
            code = event.code  # type: ignore[union-attr]
            stage = STAGE_OF_COMMAND.get(code)
            if stage is not None:
                self.close_owed = True
                if code == _MAIL and state.draining:
                    self.log(
                        logging.INFO,
                        "shutting down: new message answered TEMPFAIL",
                        event="drain_tempfail",
                    )
                    await self._answer(Status.TEMPFAIL)
                    continue
                await self._answer(await self._run(handlers.get(stage), stage, event))
            elif code == _EOM:
                await self._eom(event)
            elif code == CommandCode.OPTNEG:
                await self._negotiate(event)  # type: ignore[arg-type]
            elif code == CommandCode.ABORT:
                await self._abort()
            elif code == CommandCode.QUIT_NC:
                await self._close(new_connection=True)
            else:  # QUIT
                await self._close(new_connection=False)
                return

    def _log_eof(self) -> None:
        conn = self.conn
        if conn.buffered:
            self.log(
                logging.ERROR,
                "the MTA closed the connection in the middle of a packet (%d bytes of it received)",
                conn.buffered,
            )
        elif conn.in_message:
            self.log(logging.WARNING, "the MTA closed the connection mid-message", event="eof")
        else:
            self.log(logging.DEBUG, "the MTA closed the connection without QUIT", event="eof")

    # --- one command, one handler, one reply ------------------------------------------

    async def _run(self, handler: AnyHandler | None, stage: Stage, event: object) -> Status:
        """Call ``handler`` for ``event``; the status to answer with."""
        self.stage = stage
        # What "no verdict" is here: nothing at all for a NOREPLY stage.
        silent = self.conn.owed is None
        if handler is None:
            return Status.NOREPLY if silent else Status.CONTINUE
        if self.state.panic is not None:
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
                _LATER if silent else "answering TEMPFAIL",
                event="not_utf8",
            )
            return self._failure(silent)
        result = await call(self, handler, args)
        if type(result) is Status:
            return result
        return self._status_of(handler, result, silent)

    def _failure(self, silent: bool) -> Status:
        """A handler failed: TEMPFAIL now or, where nothing is answered, at the next reply."""
        if not silent:
            return Status.TEMPFAIL
        if self.lost is None:
            self.lost = self.stage
        return Status.NOREPLY

    def _status_of(self, handler: AnyHandler, result: object, silent: bool) -> Status:
        if result is None and handler.returns is Returns.NONE:
            return Status.NOREPLY if silent else Status.CONTINUE
        if result is FAILED:
            return self._failure(silent)
        if result is PANICKED:
            return Status.NOREPLY if silent else Status.TEMPFAIL
        if isinstance(result, Ok):
            if type(result.value) is Status:
                return result.value
            result = result.value
        elif isinstance(result, Err):
            self.log(
                logging.WARNING,
                "%s: handler %s returned Err(%s); %s",
                self.stage.value,
                handler.__qualname__,
                result.error,
                _LATER if silent else "answering TEMPFAIL",
                event="handler_err",
            )
            return self._failure(silent)
        self.log(
            logging.ERROR,
            "%s: handler %s returned %r, not a Status; answering TEMPFAIL",
            self.stage.value,
            handler.__qualname__,
            result,
            event="invalid_status",
        )
        return Status.TEMPFAIL

    async def _answer(self, status: Status) -> None:
        """Send the reply ``status`` stands for, after anything queued before it."""
        conn = self.conn
        owed = conn.owed
        error_reply = self.error_reply
        self.error_reply = None
        if owed is None:
            self._unanswered(status)
            return
        if self.state.panic is not None:
            status = Status.TEMPFAIL  # after a panic nothing but TEMPFAIL is answered
        elif self.lost is not None:
            status = self._after_lost(status)
        if status is Status.CONTINUE and owed != _EOM and owed != _OPTNEG:
            # The common case (every stage of a message but its end): a
            # CONTINUE ends nothing, so the bookkeeping of _decide is skipped
            # (measured: 5 us of 110 per W1 message above the socket).
            data = conn.send(CONTINUE)
            writes = self.writes
            if writes.outbox or writes.writing is not None:
                await writes.send(data)
            else:
                await self.transport.send(data)
            if self.metrics is not None:
                self.metrics.replied(self.stage, status, False)
            return
        await self._decide(status, owed, error_reply)

    async def _decide(self, status: Status, owed: int, error_reply: bytes | None) -> None:
        """Send a reply that may end a message (a decision, or end of message)."""
        conn = self.conn
        metrics = self.metrics
        was_in_message = metrics is not None and conn.in_message
        reply = reply_for(
            status,
            error_reply,
            faked_noreply=status is Status.NOREPLY and self._faked_noreply(owed),
        )
        try:
            if reply is None:
                raise LocalProtocolError(f"{status.name} stands for no reply")
            data = conn.send(reply)
        except LocalProtocolError as exc:
            self.log(
                logging.ERROR,
                "%s: %s is not a valid status here (%s); answering TEMPFAIL",
                self.stage.value,
                status.name,
                exc,
                event="invalid_status",
            )
            status, reply = Status.TEMPFAIL, TEMPFAIL
            data = conn.send(TEMPFAIL)
        writes = self.writes
        if owed == _EOM and (status is Status.TEMPFAIL or reply is TEMPFAIL):
            writes.drop()  # the message fails: its changes are moot
        if writes.outbox or writes.writing is not None:
            await writes.send(data)
        else:
            await self.transport.send(data)
        if not conn.in_message:
            if self.ctx._message is not None:
                self._end_message()
            if self.lost is not None and self.lost not in _CONNECTION_STAGES:
                self.lost = None
        if metrics is not None:
            metrics.replied(self.stage, status, was_in_message and not conn.in_message)

    def _unanswered(self, status: Status) -> None:
        """``status`` in a stage that negotiated no reply: nothing is sent."""
        if status is not Status.NOREPLY:
            refused = status in _REFUSALS
            self.log(
                logging.ERROR,
                "%s: handler returned %s, but this stage negotiated no reply "
                "(NOREPLY); nothing sent%s",
                self.stage.value,
                status.name,
                "; " + _LATER if refused else "",
            )
            if refused:
                self._failure(True)
        if self.metrics is not None:
            self.metrics.replied(self.stage, Status.NOREPLY, False)

    def _after_lost(self, status: Status) -> Status:
        """``status`` for a reply owed after a stage that answers nothing failed."""
        if status not in _GOING_ON:
            return status  # the handler refused anyway
        lost = self.lost
        assert lost is not None
        self.log(
            logging.WARNING,
            "%s: answering TEMPFAIL instead of %s: handler for %s failed and "
            "that stage answers nothing",
            self.stage.value,
            status.name,
            lost.value,
            event="tempfail_for_earlier",
        )
        return Status.TEMPFAIL

    def _faked_noreply(self, owed: int) -> bool:
        negotiated = self.negotiated
        return negotiated is not None and bool(negotiated.faked_noreply & NOREPLY_FLAG.get(owed, 0))

    async def _call_ignored(self, stage: Stage) -> None:
        """Run on_abort/on_close: results are ignored, panics still count."""
        handler = self.handlers.get(stage)
        if handler is None or self.state.panic is not None:
            return
        self.stage = stage
        result = await call(self, handler, ())
        self.error_reply = None  # no reply follows: a reply set here must not leak to the next
        if isinstance(result, Err):
            self.log(logging.WARNING, "on_%s returned Err(%s)", stage.value, result.error)

    # --- the commands around the stages ------------------------------------------------

    async def _negotiate(self, offer: OptionNegotiation) -> None:
        self.stage = Stage.NEGOTIATE
        handler = self.handlers.get(Stage.NEGOTIATE)
        try:
            if handler is None or self.state.panic is not None:
                negotiated = self.milter.negotiate(offer)
            else:
                negotiated = await self._negotiate_with(handler, offer)
        except NegotiationError as exc:
            self.log(
                logging.ERROR,
                "negotiation failed, closing the connection: %s",
                exc,
                event="negotiation_failed",
            )
            raise ConnectionEnded from None
        self.negotiated = negotiated
        self.actions = negotiated.actions
        self.error_reply = None  # no reply is built from negotiation: nothing may leak
        self.close_owed = True
        await self.writes.send(self.conn.accept_negotiation(negotiated))
        self.log(
            logging.DEBUG, "negotiated actions=%r opts=%r", negotiated.actions, negotiated.opts
        )

    async def _negotiate_with(self, handler: AnyHandler, offer: OptionNegotiation) -> Negotiated:
        mta_actions, mta_opts = offered(offer)
        # libmilter shows the NOREPLY_* steps it can fake as offered.
        result = await call(self, handler, (mta_actions, mta_opts | NOREPLY_OPTS))
        if isinstance(result, Ok):
            result = result.value
        if result is PANICKED or result is FAILED:
            raise ConnectionEnded
        if isinstance(result, Err):
            self.log(logging.ERROR, "on_negotiate returned Err(%s); closing", result.error)
            raise ConnectionEnded
        if not (isinstance(result, tuple) and len(result) == 3 and type(result[0]) is Status):
            self.log(
                logging.ERROR,
                "on_negotiate returned %r, not (Status, Actions, ProtocolOpts)",
                result,
            )
            raise ConnectionEnded
        status, actions, opts = result
        if status not in (Status.ALL_OPTS, Status.CONTINUE):
            self.log(
                logging.INFO, "on_negotiate answered %s: not filtering this connection", status.name
            )
            raise ConnectionEnded
        return self.milter.negotiate_choice(offer, status, actions, opts, self.requested_macros)

    async def _eom(self, event: Any) -> None:
        if event.chunk:
            # libmilter delivers data in EOM as a last body chunk.
            status = await self._run(self.handlers.get(Stage.BODY), Stage.BODY, event)
            if status not in (Status.CONTINUE, Status.NOREPLY, Status.SKIP):
                await self._answer(status)
                return
        await self._answer(await self._run(self.handlers.get(Stage.EOM), Stage.EOM, event))

    async def _abort(self) -> None:
        self.error_reply = None
        if self.lost not in _CONNECTION_STAGES:
            self.lost = None  # the message it failed is gone
        if self.metrics is not None:
            self.metrics.message_aborted()
        try:
            await self._call_ignored(Stage.ABORT)
        finally:
            self._end_message()

    async def _close(self, *, new_connection: bool) -> None:
        """The SMTP connection ended: on_close, then forget its data."""
        try:
            if self.close_owed:
                self.close_owed = False
                await self._call_ignored(Stage.CLOSE)
        finally:
            self._end_message()
            self.error_reply = None
            self.lost = None
            made, self.made_data = self.made_data, None
            self.ctx.data = None
            if made is not None:
                self._release(made, "connection_data")
            self.ctx.data = self._new_connection_data() if new_connection else None

    def _end_message(self) -> None:
        message = self.ctx._message
        self.ctx._end_message()
        if message is not None:
            self._release(message, "message_data")

    def _release(self, data: object, what: str) -> None:
        """Exit the data a factory made, if it is a context manager (a spool file, say)."""
        exit_ = getattr(type(data), "__exit__", None)
        if exit_ is None:
            return
        try:
            exit_(data, None, None, None)
        except Exception as exc:
            self._data_failed(exc, f"closing {what} ({type(data).__qualname__}.__exit__)")

    async def _connection_lost(self) -> None:
        """The connection ended without QUIT: abort and close like libmilter.

        In a call scope of its own, so that these handlers have deadlines too.
        """
        with trio.CancelScope() as self.call_scope:
            if self.conn.in_message:
                if self.metrics is not None:
                    self.metrics.message_aborted()
                await self._call_ignored(Stage.ABORT)
            await self._close(new_connection=False)
        call = self.slow_call
        if self.call_scope.cancelled_caught and call is not None:
            self.slow_call = None
            self.log(
                logging.WARNING,
                "%s: handler %s did not return within %g s; cancelled",
                call.stage.value,
                call.handler.__qualname__,
                call.timeout,
            )

    def _new_connection_data(self) -> Any:
        factory = self.milter.connection_data
        if factory is None:
            return None
        try:
            self.made_data = factory()
        except Exception as exc:
            self._data_failed(exc, "connection_data factory")
            return None
        return self.made_data

    def _data_failed(self, exc: Exception, what: str) -> None:
        # The factories are the milter's code, like a handler: the same policy.
        if self.milter.on_exception == "tempfail":
            self.log(
                logging.ERROR,
                "%s raised %r; going on",
                what,
                exc,
                exc_info=exc,
                event="handler_exception",
            )
        else:
            self.log(
                logging.CRITICAL,
                "%s panicked; the milter shuts down: %r",
                what,
                exc,
                exc_info=exc,
                event="panic",
            )
            self.state.trip(exc)

    def _task_panicked(self, exc: BaseException) -> None:
        self.log(
            logging.CRITICAL,
            "a background task panicked; the milter shuts down: %r",
            exc,
            exc_info=exc,
            event="panic",
        )
        self.state.trip(exc)

    def end(self) -> None:
        """The connection is over: stop its background tasks and its I/O watch."""
        if self.tasks is not None:
            self.tasks.cancel()
        self.ended = True

    # --- the I/O deadline of a connection served without a server --------------------------

    async def watch_io(self) -> None:
        period = self.io.period
        while not self.ended:
            await trio.sleep(period)
            if self.ended or self.io.check(self.transport, self.conn, trio.current_time()):
                return


async def serve_connection(
    milter: Milter[Any, Any],
    stream: trio.abc.Stream,
    state: ServerState | None = None,
    limits: Limits | None = None,
    connection_id: str = "-",
    nursery: trio.Nursery | None = None,
) -> None:
    """Serve one MTA connection on ``stream`` until it ends; close the stream.

    ``state`` is shared with the server's other connections (a fresh one if
    None); ``limits`` default to those of the default `ServerOptions`.
    Background work (``ctx.connection_nursery``, and the watchers of slow
    handler calls) runs in ``nursery`` (the server's; one of its own if
    None) and is cancelled when the connection ends; an exception escaping a
    background task is a panic.
    """
    if nursery is None:
        async with trio.open_nursery() as own:
            await serve_connection(milter, stream, state, limits, connection_id, own)
            own.cancel_scope.cancel()
        return
    if state is None:
        state = ServerState()
    if limits is None:
        limits = ServerOptions().limits_for(milter)
    metrics = state.metrics
    if metrics is not None:
        metrics.connection_opened()
    session = Session(milter, stream, state, limits, connection_id, nursery)
    state.sessions.add(session)
    try:
        if not state.watched:
            nursery.start_soon(session.watch_io)
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
        state.sessions.discard(session)
        if state.draining:
            state.left_message(session)
        session.end()
        if metrics is not None:
            metrics.connection_closed()
        await close_stream(stream)


async def refuse_connection(stream: trio.abc.Stream, connection_id: str) -> None:
    """Answer an MTA connection there is no room for: TEMPFAIL, at once.

    It is negotiated with nothing asked for, and the first command owing a
    reply (the CONNECT) is answered TEMPFAIL: the MTA tempfails that SMTP
    session itself (451), whatever its ``milter_default_action``, instead
    of waiting out its connect timeout. Bounded by `REFUSAL_TIMEOUT`.
    """
    conn = MilterConnection()
    transport = transport_for(stream)
    try:
        with trio.move_on_after(REFUSAL_TIMEOUT):
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    data = await transport.receive()
                    if not data:
                        return
                    conn.receive_data(data)
                elif isinstance(event, OptionNegotiation):
                    version = min(int(event.version), 6)
                    await transport.send(conn.accept_negotiation(Negotiated(version=version)))
                elif conn.owed is not None:
                    await transport.send(conn.send(TEMPFAIL))
                    return
                elif event.code == CommandCode.QUIT:  # type: ignore[union-attr]
                    return
    except (RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        log.debug("[%s] refused connection ended: %s", connection_id, exc)
    finally:
        await close_stream(stream)
