"""`triomilter tap`: a transparent proxy between an MTA and a milter that shows what they say.

The MTA connects to the tap (``--listen``); the tap connects to the real
milter (``--milter``, any implementation) and forwards every byte, both
ways, unchanged, as soon as it arrives (and is decoded: a reply is never
shown before the command it answers). Each direction is decoded
with the engine (`decode_command`, `decode_reply`, `check_reply`) by an
`Observer`, which also keeps the little state needed to judge the replies:
the negotiated actions and steps, and which command is owed a reply.

One line per command and per reply (text, or JSON with ``--json``): the
connection id, who spoke, the decoded arguments, the macros that came with
a command, the time the milter took to answer. Protocol violations (a reply
where none is owed, a missing reply, an action that was not negotiated, an
unknown code, a malformed packet) and slow replies (``--slow``) are flagged
on lines of their own, and the bytes are forwarded all the same: the tap
never breaks a connection the MTA and the milter would keep.

Bounds: each direction holds at most one packet of up to 65535 data bytes
for decoding (body chunks and larger packets are counted as they stream
past, not held); output lines wait in a queue of ``--max-queue`` lines and
are dropped (and counted) rather than slow down the traffic when the
output cannot keep up; ``--max-connections`` connections are served at
once; every connection has an idle timeout.
"""

from __future__ import annotations

import argparse
import enum
import errno
import itertools
import json
import logging
import math
import signal
import sys
import time
from collections.abc import Callable
from typing import IO, Any

import attrs
import trio

from ._context import SocketFamily
from ._display import flags_name, os_error, show, text_json
from ._sockets import SocketSpecError, describe_address, open_listener
from ._sockets import parse_socket_spec as _parse_socket_spec
from .protocol import (
    ALL_ACTIONS,
    ALL_PROTOCOL_OPTS,
    FINAL_REPLIES,
    NO_FLAG,
    NOREPLY_FLAG,
    Actions,
    Body,
    CommandCode,
    DefineMacros,
    EndOfMessage,
    MacroStage,
    Negotiated,
    OptionNegotiation,
    OptionNegotiationReply,
    ProtocolError,
    ProtocolOpts,
    ReplaceBody,
    ReplyCode,
    ReplyWithCode,
    check_reply,
    decode_command,
    decode_reply,
)
from .protocol._constants import ACTION_OF_REPLY
from .protocol._state import EOM_MODIFICATIONS

log = logging.getLogger("triomilter")

MAX_DECODED = 65535
"""Packets with more data bytes are counted, not decoded (nor held in memory)."""
RECEIVE_SIZE = 65536
_STREAMED = frozenset({CommandCode.BODY, ReplyCode.REPLBODY})  # both 'B' and 'b'
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


# --- framing that survives anything -------------------------------------------------------


@attrs.frozen
class Frame:
    """A whole packet: its code, its data (None if not kept), its data length."""

    code: int
    payload: bytes | None
    length: int


class Framer:
    """Cuts one direction's bytes into packets, tolerating garbage.

    A packet of at most `MAX_DECODED` data bytes is held until complete;
    body chunks and larger packets are skipped as they stream past (only
    their code and length are kept). A length of 0 is reported as a packet
    without a code (-1). Memory: at most one packet's data.
    """

    __slots__ = ("_code", "_head", "_left", "_length", "_payload")

    def __init__(self) -> None:
        self._head = bytearray()  # the length and code of the packet being read
        self._code = -1  # the code of the packet whose data is being read, -1: none
        self._length = 0
        self._left = 0  # data bytes still to come
        self._payload: bytearray | None = None  # None: skipped

    def feed(self, data: bytes) -> list[Frame]:
        frames: list[Frame] = []
        view = memoryview(data)
        while view:
            if self._code < 0:
                view = self._read_head(view, frames)
                continue
            take = min(self._left, len(view))
            if self._payload is not None:
                self._payload += view[:take]
            view = view[take:]
            self._left -= take
            if self._left == 0:
                frames.append(self._finish())
        return frames

    def _read_head(self, view: memoryview, frames: list[Frame]) -> memoryview:
        take = min(5 - len(self._head), len(view))
        self._head += view[:take]
        view = view[take:]
        if len(self._head) >= 4 and not any(self._head[:4]):
            frames.append(Frame(-1, None, 0))  # length 0: a packet with no code
            rest = bytes(self._head[4:]) + bytes(view)
            self._head.clear()
            return memoryview(rest)
        if len(self._head) < 5:
            return view
        self._length = self._left = int.from_bytes(self._head[:4], "big") - 1
        self._code = self._head[4]
        self._head.clear()
        keep = self._length <= MAX_DECODED and self._code not in _STREAMED
        self._payload = bytearray() if keep else None
        if self._left == 0:
            frames.append(self._finish())
        return view

    def _finish(self) -> Frame:
        payload = bytes(self._payload) if self._payload is not None else None
        frame = Frame(self._code, payload, self._length)
        self._code = -1
        self._payload = None
        return frame

    @property
    def partial(self) -> bool:
        """Whether a packet is incomplete (the stream ended in the middle of one)."""
        return self._code >= 0 or bool(self._head)


# --- what was said -----------------------------------------------------------------------


@attrs.define
class Event:
    """One line of the tap's output."""

    conn: int
    kind: str
    """``command``, ``reply``, ``violation``; ``open``, ``eof`` (one side closed), ``close``
    (the connection is over), ``error`` (of the tap), ``dropped`` (output lines lost)."""
    side: str = "tap"
    """Who sent it: ``mta``, ``milter`` (or ``tap``)."""
    name: str = ""
    code: str = ""
    args: dict[str, Any] = attrs.Factory(dict)
    macros: dict[str, str] | None = None
    answers: str | None = None
    """The command a reply answers."""
    ms: float | None = None
    slow: bool = False
    message: str = ""
    time: float = attrs.Factory(time.time)


def _code_text(code: int) -> str:
    return chr(code) if 32 < code < 127 else f"\\x{code:02x}"


def _command_name(code: int) -> str:
    try:
        return CommandCode(code).name
    except ValueError:
        return f"unknown command {_code_text(code)!r}"


def _reply_name(code: int) -> str:
    try:
        return ReplyCode(code).name
    except ValueError:
        return f"unknown reply {_code_text(code)!r}"


def _flags(value: int, kind: type[enum.IntFlag], every: int) -> str:
    if value == every:
        return f"ALL ({value:#x})"  # what Postfix and Sendmail offer
    return f"{flags_name(value, kind)} ({value:#x})"


def _arguments(item: object) -> dict[str, Any]:
    """The decoded fields of a command or reply, for display."""
    if isinstance(item, Body | ReplaceBody):
        return {"size": len(item.chunk)}
    if isinstance(item, EndOfMessage):
        return {"size": len(item.chunk)} if item.chunk else {}
    if isinstance(item, OptionNegotiation | OptionNegotiationReply):
        args: dict[str, Any] = {
            "version": item.version,
            "actions": _flags(item.actions, Actions, ALL_ACTIONS),
            "protocol": _flags(item.opts, ProtocolOpts, ALL_PROTOCOL_OPTS),
        }
        if isinstance(item, OptionNegotiationReply) and item.macros:
            args["macros"] = {MacroStage(s).name: text_json(n) for s, n in item.macros}
        return args
    result: dict[str, Any] = {}
    if not attrs.has(type(item)):
        return result
    for field in attrs.fields(type(item)):  # type: ignore[arg-type]
        value = getattr(item, field.name)
        if isinstance(value, bytes):
            value = text_json(value)
        elif isinstance(value, tuple):
            value = [text_json(v) if isinstance(v, bytes) else v for v in value]
        elif isinstance(value, enum.Enum):
            value = value.name
        result[field.name] = value
    return result


@attrs.define
class _Pending:
    code: int
    since: float
    reported: bool = False


class Observer:
    """The state one tapped connection needs to decode and judge its traffic (sans-IO).

    `from_mta` and `from_milter` take the bytes of each direction with the
    (monotonic) time they arrived and return the `Event` s to show. Never
    raises for anything the peers send.
    """

    def __init__(self, conn: int, *, slow_ms: float | None = None) -> None:
        self.conn = conn
        self.slow_ms = slow_ms
        self.mta = Framer()
        self.milter = Framer()
        self.offer: OptionNegotiation | None = None
        self.negotiated: Negotiated | None = None
        self.pending: _Pending | None = None
        self.macros: DefineMacros | None = None
        self.commands = 0
        self.replies = 0
        self._body_run = 0

    # --- the MTA's side ------------------------------------------------------------------

    def from_mta(self, data: bytes, now: float) -> list[Event]:
        events: list[Event] = []
        for frame in self.mta.feed(data):
            events += self._command(frame, now)
        return events

    def _command(self, frame: Frame, now: float) -> list[Event]:
        events: list[Event] = []
        if frame.code < 0:
            return [self._violation("mta", "a packet of length 0 (no command code)")]
        code = frame.code
        event = Event(self.conn, "command", "mta", _command_name(code), _code_text(code))
        item = self._decode(frame, event, decode_command)
        if isinstance(item, DefineMacros):
            events += self._flush_macros()
            self.macros = item
            return events
        if self.macros is not None:
            if self.macros.stage == code:
                event.macros = _macro_dict(self.macros)
                self.macros = None
            else:
                events += self._flush_macros()
        self.commands += 1
        events.append(event)
        if self.pending is not None and code in FINAL_REPLIES:
            waited = self.pending
            events.append(
                self._violation(
                    "mta",
                    f"{_command_name(code)} sent while the reply to "
                    f"{_command_name(waited.code)} is still due (a missing reply)",
                )
            )
            self.pending = None
        events += self._track_command(code, item, now)
        return events

    def _track_command(self, code: int, item: object, now: float) -> list[Event]:
        events: list[Event] = []
        if isinstance(item, OptionNegotiation):
            self.offer = item
            self.negotiated = None
        opts = self.negotiated.opts if self.negotiated is not None else 0
        flag = NO_FLAG.get(code)
        if flag is not None and opts & flag:
            events.append(
                self._violation(
                    "mta", f"{_command_name(code)} sent, but the milter negotiated {flag.name}"
                )
            )
        silenced = NOREPLY_FLAG.get(code)
        if code in FINAL_REPLIES and not (silenced is not None and opts & silenced):
            self.pending = _Pending(code, now)
            self._body_run = 0
        return events

    def _flush_macros(self) -> list[Event]:
        """A macro packet whose command did not follow (Postfix sends them for skipped steps)."""
        if self.macros is None:
            return []
        macros, self.macros = self.macros, None
        stage = _command_name(macros.stage)
        event = Event(self.conn, "command", "mta", "MACRO", "D", {"for": stage})
        event.macros = _macro_dict(macros)
        return [event]

    # --- the milter's side ---------------------------------------------------------------

    def from_milter(self, data: bytes, now: float) -> list[Event]:
        events: list[Event] = []
        for frame in self.milter.feed(data):
            events += self._reply(frame, now)
        return events

    def _reply(self, frame: Frame, now: float) -> list[Event]:
        if frame.code < 0:
            return [self._violation("milter", "a packet of length 0 (no reply code)")]
        code = frame.code
        event = Event(self.conn, "reply", "milter", _reply_name(code), _code_text(code))
        item = self._decode(frame, event, decode_reply)
        self.replies += 1
        events = [event]
        pending = self.pending
        if pending is None:
            events.append(self._violation("milter", f"{event.name} where no reply is owed"))
            return events
        event.answers = _command_name(pending.code)
        event.ms = (now - pending.since) * 1000
        if self.slow_ms is not None and event.ms > self.slow_ms:
            event.slow = True
        finals = FINAL_REPLIES.get(pending.code, frozenset())
        if code in finals:
            self.pending = None
            events += self._final(code, item)
        elif pending.code == CommandCode.EOM and code in EOM_MODIFICATIONS:
            events += self._change(code)
        else:
            events.append(
                self._violation("milter", f"{event.name} is not a valid reply to {event.answers}")
            )
        return events

    def _final(self, code: int, item: object) -> list[Event]:
        if code == ReplyCode.OPTNEG and isinstance(item, OptionNegotiationReply):
            if self.offer is None:
                return [self._violation("milter", "a negotiation reply without an offer")]
            try:
                self.negotiated = check_reply(self.offer, item)
            except ProtocolError as exc:
                self.negotiated = Negotiated(item.version, item.actions, item.opts)
                return [self._violation("milter", str(exc))]
            return []
        opts = self.negotiated.opts if self.negotiated is not None else 0
        if code == ReplyCode.SKIP and not opts & ProtocolOpts.SKIP:
            return [self._violation("milter", "SKIP, but SKIP was not negotiated")]
        if isinstance(item, ReplyWithCode) and item.text[:1] not in (b"4", b"5"):
            return [self._violation("milter", f"REPLYCODE is not a 4xx/5xx reply: {item.text!r}")]
        return []

    def _change(self, code: int) -> list[Event]:
        actions = self.negotiated.actions if self.negotiated is not None else 0
        needed = ACTION_OF_REPLY.get(code)
        if needed is not None and not actions & needed:
            name = _reply_name(code)
            return [
                self._violation(
                    "milter", f"{name} needs the {needed.name} action, which was not negotiated"
                )
            ]
        if code == ReplyCode.REPLBODY:
            if self._body_run == 2:
                return [self._violation("milter", "REPLBODY chunks must be contiguous")]
            self._body_run = 1
        elif self._body_run == 1 and code != ReplyCode.PROGRESS:
            self._body_run = 2
        return []

    # --- both ------------------------------------------------------------------------------

    def _decode(self, frame: Frame, event: Event, decode: Callable[[int, bytes], object]) -> object:
        """The decoded command or reply, its arguments put on ``event``; None if it failed."""
        if frame.payload is None:
            event.args = {"size": frame.length}
            if frame.code not in _STREAMED:
                event.message = f"not decoded: more than {MAX_DECODED} data bytes"
            return None
        try:
            item = decode(frame.code, frame.payload)
        except ProtocolError as exc:
            event.message = f"malformed: {exc}"
            event.args = {"size": len(frame.payload)}
            return None
        event.args = _arguments(item)
        return item

    def _violation(self, side: str, message: str) -> Event:
        return Event(self.conn, "violation", side, message=message)

    def overdue(self, now: float, limit: float) -> list[Event]:
        """A reply that has not come within ``limit`` seconds (reported once)."""
        pending = self.pending
        if pending is None or pending.reported or now - pending.since < limit:
            return []
        pending.reported = True
        return [
            self._violation(
                "milter", f"no reply to {_command_name(pending.code)} after {limit:g} s"
            )
        ]

    def reply_deadline(self, limit: float) -> float:
        pending = self.pending
        if pending is None or pending.reported:
            return math.inf
        return pending.since + limit

    def closed(self, side: str) -> list[Event]:
        """``side`` closed its end: what is left unsaid."""
        events = self._flush_macros() if side == "mta" else []
        framer = self.mta if side == "mta" else self.milter
        if framer.partial:
            events.append(self._violation(side, "closed in the middle of a packet"))
        if (
            side == "milter"
            and self.pending is not None
            and self.pending.code != CommandCode.OPTNEG
        ):
            name = _command_name(self.pending.code)
            events.append(self._violation("milter", f"closed with the reply to {name} still due"))
            self.pending = None
        return events


def _macro_dict(macros: DefineMacros) -> dict[str, str]:
    return {text_json(name): text_json(value) for name, value in macros.macros}


# --- output ------------------------------------------------------------------------------


def format_text(event: Event) -> str:
    """One event as a line of text."""
    clock = time.strftime("%H:%M:%S", time.localtime(event.time))
    stamp = f"{clock}.{int(event.time % 1 * 1e6):06d} #{event.conn}"
    if event.kind == "violation":
        return f"{stamp} !! {event.side}: {event.message}"
    if event.kind == "error":
        return f"{stamp} !! {event.message}"
    if event.kind not in ("command", "reply"):
        return f"{stamp} -- {event.message}"
    arrow = "MTA> " if event.side == "mta" else "<MIL "
    parts = [stamp, arrow, event.name]
    if event.args:
        parts.append(" ".join(f"{k}={_value(v)}" for k, v in event.args.items()))
    if event.macros:
        parts.append("macros: " + " ".join(f"{k}={show(v)}" for k, v in event.macros.items()))
    if event.message:
        parts.append(f"({event.message})")
    if event.ms is not None:
        parts.append(f"[{event.ms:.2f} ms{' SLOW' if event.slow else ''}]")
    return " ".join(parts)


def _value(value: Any) -> str:
    if isinstance(value, str):
        return repr(show(value, 200))
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def format_json(event: Event) -> str:
    """One event as a JSON line (see docs/tools.md)."""
    document: dict[str, Any] = {"time": round(event.time, 6), "conn": event.conn}
    document["type"] = event.kind
    document["from"] = event.side
    if event.kind in ("command", "reply"):
        document.update(name=event.name, code=event.code, args=event.args)
        if event.macros is not None:
            document["macros"] = event.macros
        if event.answers is not None:
            document["answers"] = event.answers
        if event.ms is not None:
            document["ms"] = round(event.ms, 3)
            document["slow"] = event.slow
    if event.message:
        document["message"] = event.message
    return json.dumps(document, ensure_ascii=False)


class Output:
    """Lines to a text stream through a bounded queue, written by a thread.

    `emit` never blocks: when the queue is full the line is dropped and
    counted, and a line saying how many were dropped follows once there is
    room again.
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
                    self._send.send_nowait(
                        Event(
                            0, "dropped", message=f"{self.dropped} line(s) dropped: output too slow"
                        )
                    )
                    self.dropped = 0
                self._send.send_nowait(event)
            except trio.WouldBlock:
                self.dropped += 1

    async def run(self) -> None:
        """Write lines until cancelled; then what is queued (bounded by the queue size)."""
        batch: list[Event] = []
        try:
            while True:
                batch = [await self._receive.receive()]
                batch += self._drain()
                await self._write(batch)
                batch = []
        finally:
            with trio.CancelScope(shield=True):
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
        text = "".join(self.formatter(event) + "\n" for event in events)
        await trio.to_thread.run_sync(self._write_sync, text)

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
    """Accepts MTA connections and runs one `_Connection` per connection."""

    def __init__(self, options: TapOptions, output: Output) -> None:
        self.options = options
        self.output = output
        self.milter = _parse_socket_spec(options.milter)
        self._ids = itertools.count(1)
        self._limit = trio.Semaphore(
            options.max_connections
        )  # taken by the accept loop, given back by the connection

    async def serve(
        self, listener: trio.SocketListener, task_status: trio.TaskStatus[object]
    ) -> None:
        async with listener, trio.open_nursery() as nursery:
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
        try:
            await _Connection(self, stream, conn).run()
        finally:
            self._limit.release()

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
        self.changed = trio.Event()
        self.scope = trio.CancelScope()
        self.done = 0

    async def run(self) -> None:
        options = self.options
        peer = _peer(self.mta)
        self.emit([Event(self.conn, "open", "mta", message=f"connection from {peer}")])
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
                    nursery.start_soon(self._watch)
            except Exception as exc:  # never crash the tap for one connection
                ended = f"ended by an error: {exc!r}"
        if self.scope.cancelled_caught:
            ended = f"closed: idle for {options.idle_timeout:g} s"
        observer = self.observer
        self.emit(
            [
                Event(
                    self.conn,
                    "close",
                    message=f"{ended}; {observer.commands} command(s), "
                    f"{observer.replies} reply(ies)",
                )
            ]
        )

    async def _pump(
        self,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        side: str,
        both: trio.CancelScope,
    ) -> None:
        feed = self.observer.from_mta if side == "mta" else self.observer.from_milter
        decoding = True
        who = "the MTA" if side == "mta" else "the milter"
        try:
            while data := await source.receive_some(RECEIVE_SIZE):
                now = trio.current_time()
                self.scope.deadline = now + self.options.idle_timeout
                if decoding:
                    # Decoded (and queued for output) before the bytes go on, so a
                    # reaction of the other side is never shown before its cause.
                    try:
                        self.emit(feed(data, now))
                    except Exception as exc:  # a decoding bug must not cost the connection
                        decoding = False
                        message = f"decoding stopped: {exc!r}"
                        self.emit([Event(self.conn, "error", side, message=message)])
                await sink.send_all(data)
                self.changed.set()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            cause = exc.__cause__ or exc
            self.emit([Event(self.conn, "eof", side, message=f"{who}: connection lost ({cause})")])
            both.cancel()
            return
        self.emit([Event(self.conn, "eof", side, message=f"{who} closed its side")])
        self.emit(self.observer.closed(side))
        self.changed.set()
        try:
            await sink.send_eof()  # half-close: the other side may still answer
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            both.cancel()
        self.done += 1
        if self.done == 2:
            both.cancel()

    async def _watch(self) -> None:
        """Reports a reply that does not come within ``reply_timeout`` (once per command)."""
        limit = self.options.reply_timeout
        while True:
            with trio.move_on_at(self.observer.reply_deadline(limit)):
                await self.changed.wait()
                self.changed = trio.Event()
                continue
            self.emit(self.observer.overdue(trio.current_time(), limit))


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
    listener = await open_listener(_parse_socket_spec(options.listen))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(output.run)
        if handle_signals:
            nursery.start_soon(_stop_on_signal, nursery.cancel_scope)
        address = await nursery.start(tap.serve, listener)
        log.info(
            "tap listening on %s, forwarding to %s",
            describe_address(address),
            tap.milter,
        )
        task_status.started(address)


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


__all__ = ["Observer", "TapOptions", "run_tap"]
