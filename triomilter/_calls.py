"""Calling one handler: its deadline, its failures, and what it costs the event loop.

The failure semantics of SPEC §2.1 live here, in one place:

- a ``Result`` handler's ``Err``, or a `MilterError` it raises: TEMPFAIL;
- with ``on_exception="tempfail"``, any other exception: logged with its
  traceback, TEMPFAIL, the milter goes on;
- otherwise any other exception escaping a handler (any at all from a
  ``Status`` or ``None`` handler) is a panic: TEMPFAIL, and the server's
  state is tripped, after which no handler runs anywhere;
- a handler past its deadline is cancelled: TEMPFAIL and a warning (the
  session does it, where the cancellation lands);
- the MTA hanging up while a handler runs cancels it and ends the connection.

Theory of operation. Most handlers return without waiting for anything
(``return Status.CONTINUE`` after looking at their arguments). Arming a
cancel scope with a deadline costs about 7 us, half of a whole round trip
with the MTA, so a handler is first stepped by hand (``coro.send(None)``):
if it finishes in that step it needed no deadline. Only a handler that
waits (a DNS lookup, a database) gets one: the session's call scope, entered
once per connection, is given the deadline, a task watches the socket for
the MTA hanging up and, at end of message, a task sends progress to the MTA. Every step a
handler runs without yielding is timed: one that holds the event loop
longer than the stall threshold is logged, since every other connection
waited meanwhile.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any

import trio

from ._errors import ConnectionLost, MilterError
from ._handlers import AnyHandler, Returns
from ._stage import Stage
from ._status import Err

if TYPE_CHECKING:
    from ._session import Session

log = logging.getLogger("triomilter")

PANICKED: Any = object()
"""What a call returns when the handler panicked (answer TEMPFAIL)."""
FAILED: Any = object()
"""What a call returns when the handler failed and the milter goes on (answer TEMPFAIL)."""

_perf_counter = time.perf_counter


class ConnectionEnded(Exception):
    """End this connection now (the reason is already logged)."""


async def call(session: Session, handler: AnyHandler, args: tuple[object, ...]) -> object:
    """Call ``handler(ctx, *args)``: its result, or `PANICKED` / `FAILED`.

    Raises `ConnectionEnded` when the MTA went away meanwhile.
    """
    try:
        if handler.is_async:
            coro: Coroutine[Any, Any, object] = handler.func(session.ctx, *args)  # type: ignore[assignment]
            started = _perf_counter()
            try:
                step = coro.send(None)
            except StopIteration as done:
                # Returned without waiting: the common case, kept to a clock read.
                held = _perf_counter() - started
                if held > session.stall_warning or session.metrics is not None:
                    _ran(session, handler, held, True)
                return done.value
            _ran(session, handler, _perf_counter() - started, False)
            return await _finish(session, handler, _drive(session, handler, coro, step))
        if handler.blocking:
            return await _finish(session, handler, _in_thread(session, handler, args))
        started = _perf_counter()
        result = handler.func(session.ctx, *args)
        waits = inspect.isawaitable(result)  # an async callable object, say
        _ran(session, handler, _perf_counter() - started, not waits)
        if waits:
            return await _finish(session, handler, _await(result))  # type: ignore[arg-type]
        return result
    except Exception as exc:
        return _failed(session, handler, exc)
    except BaseExceptionGroup as group:
        # A handler's own nursery failing while being cancelled: the failure
        # counts, the cancellation goes on.
        cancelled, failures = group.split(trio.Cancelled)
        if failures is None:
            raise
        outcome = _unexpected(session, handler, failures)
        if cancelled is not None:
            raise cancelled from None
        return outcome


def _what_follows(session: Session) -> str:
    """How a failed call is answered, for the log line."""
    if session.conn.owed is not None:
        return "answering TEMPFAIL"
    if session.stage in (Stage.ABORT, Stage.CLOSE):
        return "going on"
    return "TEMPFAIL at the next reply instead (this stage answers nothing)"


def _ran(session: Session, handler: AnyHandler, held: float, done: bool) -> None:
    """A handler held the event loop ``held`` seconds (``done``: and returned)."""
    if held > session.stall_warning:
        session.state.stalled(session, handler, held)
    if done and session.metrics is not None:
        session.metrics.handler_ran(handler.stage, held)


def _failed(session: Session, handler: AnyHandler, exc: Exception) -> object:
    """What an exception escaping ``handler`` makes of the call."""
    if isinstance(exc, ConnectionLost):
        # The MTA went away while a change was written: this connection ends
        # (on_abort/on_close), the milter does not.
        session.log(logging.WARNING, "%s", exc, event="connection_lost")
        raise ConnectionEnded from None
    if isinstance(exc, MilterError) and handler.returns is Returns.RESULT:
        return Err(exc)
    return _unexpected(session, handler, exc)


def _unexpected(session: Session, handler: AnyHandler, exc: BaseException) -> object:
    if session.milter.on_exception == "tempfail":
        session.log(
            logging.ERROR,
            "%s: handler %s raised %r; %s (on_exception='tempfail')",
            session.stage.value,
            handler.__qualname__,
            exc,
            _what_follows(session),
            exc_info=exc,
            event="handler_exception",
        )
        return FAILED
    session.log(
        logging.CRITICAL,
        "handler %s panicked; the milter shuts down: %r",
        handler.__qualname__,
        exc,
        exc_info=exc,
        event="panic",
    )
    session.state.trip(exc)
    return PANICKED


async def _finish(session: Session, handler: AnyHandler, work: Awaitable[object]) -> object:
    """Run the rest of a call that waits: under its deadline, watched for a hang-up.

    The deadline is the session's call scope's (see `Session.run`): a scope
    of our own entered here would sit inside whatever scopes the handler
    entered in its first step, which Trio forbids. When it fires, the
    cancellation unwinds to the session, which answers TEMPFAIL (or, if the
    MTA hung up, ends the connection).

    The watchers run in the connection's nursery (a nursery of our own here
    would wrap the handler's exceptions in groups), each inside a cancel
    scope made here, which stops it even before it first runs.
    """
    limits = session.limits
    eom = session.stage is Stage.EOM
    timeout = limits.eom_timeout if eom else limits.handler_timeout
    state = session.state
    scope = session.call_scope
    now = trio.current_time()
    session.slow_call = SlowCall(handler, session.stage, timeout, now)
    scope.deadline = now + timeout
    watchers = [trio.CancelScope()]
    session.start_watcher(_watch_hangup, session, watchers[0])
    if eom:
        watchers.append(trio.CancelScope())
        session.start_watcher(_send_progress, session, limits.progress_interval, watchers[1])
    state.call_started()
    try:
        return await work
    finally:
        for watcher in watchers:
            watcher.cancel()
        state.call_ended()
        scope.deadline = math.inf
        if session.metrics is not None:
            session.metrics.handler_ran(handler.stage, trio.current_time() - now)


class SlowCall:
    """The handler call that waits now, for the log when its deadline passes."""

    __slots__ = ("handler", "hangup", "stage", "started", "timeout")

    def __init__(self, handler: AnyHandler, stage: Stage, timeout: float, started: float) -> None:
        self.handler = handler
        self.stage = stage
        self.timeout = timeout
        self.started = started
        self.hangup: str | None = None
        """Why the call was cancelled, if the MTA went away."""


async def _watch_hangup(session: Session, watchers: trio.CancelScope) -> None:
    with watchers:
        # Stopped before it first ran: the session may be reading the socket again.
        await trio.lowlevel.checkpoint_if_cancelled()
        reason = await session.transport.wait_hangup()
        if session.slow_call is not None:
            session.slow_call.hangup = reason
        session.call_scope.cancel()


async def _send_progress(session: Session, interval: float, watchers: trio.CancelScope) -> None:
    """Keep the MTA's content timeout from running out while a slow end of message works."""
    with watchers:
        while True:
            await trio.sleep(interval)
            await session.progress()


@types.coroutine
def _drive(
    session: Session, handler: AnyHandler, coro: Coroutine[Any, Any, object], first: object
) -> Generator[Any, Any, object]:
    """Go on awaiting ``coro``, which already yielded ``first`` to Trio.

    What ``await`` does, by hand: hand what the coroutine yields to the
    scheduler and what the scheduler sends (or throws) back to the
    coroutine, timing each step the coroutine runs.
    """
    yielded = first
    stall = session.limits.stall_warning
    while True:
        try:
            sent = yield yielded
        except BaseException as exc:  # Cancelled, GeneratorExit...: the coroutine's to handle
            step: Callable[[Any], Any] = coro.throw
            value: Any = exc
        else:
            step, value = coro.send, sent
        started = _perf_counter()
        try:
            yielded = step(value)
        except StopIteration as done:
            return done.value
        finally:
            held = _perf_counter() - started
            if held > stall:
                session.state.stalled(session, handler, held)


async def _await(awaitable: Awaitable[object]) -> object:
    return await awaitable


async def _in_thread(session: Session, handler: AnyHandler, args: tuple[object, ...]) -> object:
    # abandon_on_cancel: at the deadline the command is answered at once; the
    # thread's late result is dropped (a thread cannot be interrupted).
    return await trio.to_thread.run_sync(
        handler.func,
        session.ctx,
        *args,
        limiter=session.state.thread_limiter,
        abandon_on_cancel=True,
    )
