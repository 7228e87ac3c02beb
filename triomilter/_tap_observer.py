"""What `triomilter tap` sees: both directions of one connection, framed, judged, shown (sans-IO).

`Observer` takes each direction's bytes with the time they arrived and
returns `Event` s: one per command and per reply, and one per protocol
violation. It is on the forwarding path, so it only frames the bytes and
follows the codes: which command is owed a reply (``NOREPLY_*`` honoured),
what was negotiated (the one packet decoded at once), which changes the
actions allow. Everything else an event shows (the arguments, the macros, a
malformed packet) is decoded when the event is formatted, by the writer,
after the bytes went on.

Never raises for anything the peers send; holds at most one packet of up
to `MAX_DECODED` data bytes per direction (body chunks and larger packets
are counted as they stream past).
"""

from __future__ import annotations

import enum
import functools
import json
import time
from typing import Any

import attrs

from ._display import flags_name, show, text_json
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
    check_reply,
    decode_command,
    decode_reply,
)
from .protocol._constants import ACTION_OF_REPLY
from .protocol._state import EOM_MODIFICATIONS

MAX_DECODED = 65535
"""Packets with more data bytes are counted, not decoded (nor held in memory)."""
_STREAMED = frozenset({CommandCode.BODY, ReplyCode.REPLBODY})  # 'B' and 'b': sizes only
_MACRO = int(CommandCode.MACRO)
_OPTNEG = int(CommandCode.OPTNEG)
_EOM = int(CommandCode.EOM)
_SKIP = int(ReplyCode.SKIP)
_REPLYCODE = int(ReplyCode.REPLYCODE)
_REPLBODY = int(ReplyCode.REPLBODY)
_PROGRESS = int(ReplyCode.PROGRESS)
_SKIP_BIT = int(ProtocolOpts.SKIP)


# --- framing that survives anything -------------------------------------------------------


@attrs.frozen
class Frame:
    """A whole packet: its code (-1: a packet of length 0), its data if kept, its length."""

    code: int
    payload: bytes | None
    length: int


class Framer:
    """Cuts one direction's bytes into packets, tolerating garbage.

    A packet of at most `MAX_DECODED` data bytes is held until complete;
    body chunks and larger packets are skipped as they stream past (only
    their code and length are kept). Memory: at most one packet's data.
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
        if not self._head and len(view) >= 5:
            head, view = view[:5], view[5:]  # the usual case: a whole head at once
        else:
            take = min(5 - len(self._head), len(view))
            self._head += view[:take]
            view = view[take:]
            if len(self._head) >= 4 and not any(self._head[:4]):
                frames.append(Frame(-1, None, 0))
                rest = bytes(self._head[4:]) + bytes(view)
                self._head.clear()
                return memoryview(rest)
            if len(self._head) < 5:
                return view
            head = memoryview(bytes(self._head))
            self._head.clear()
        length = int.from_bytes(head[:4], "big")
        if length == 0:
            frames.append(Frame(-1, None, 0))  # no code: the fifth byte starts the next
            return memoryview(bytes(head[4:]) + bytes(view))
        self._length = self._left = length - 1
        self._code = head[4]
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


# --- events -----------------------------------------------------------------------------------


def _code_text(code: int) -> str:
    return chr(code) if 32 < code < 127 else f"\\x{code:02x}"


def command_name(code: int) -> str:
    try:
        return CommandCode(code).name
    except ValueError:
        return f"unknown command {_code_text(code)!r}"


def reply_name(code: int) -> str:
    try:
        return ReplyCode(code).name
    except ValueError:
        return f"unknown reply {_code_text(code)!r}"


@attrs.define(slots=True)
class Event:
    """One line of the tap's output.

    For commands and replies, `describe` decodes ``payload`` (lazily: the
    writer does it, off the forwarding path).
    """

    conn: int
    kind: str
    """``command``, ``reply``, ``violation``; ``open``, ``eof`` (one side closed), ``close``
    (the connection is over), ``error`` (of the tap), ``dropped`` (output lines lost)."""
    side: str = "tap"
    """Who sent it: ``mta``, ``milter`` (or ``tap``)."""
    code: int = -1
    payload: bytes | None = None
    length: int = 0
    macros: bytes | None = None
    """The payload of the macro packet that came just before a command."""
    item: object = None
    """The decoded command or reply, when the observer needed it at once."""
    answers: str | None = None
    ms: float | None = None
    slow: bool = False
    message: str = ""
    time: float = attrs.Factory(time.time)

    @property
    def name(self) -> str:
        if self.kind == "command":
            return "MACRO" if self.code == _MACRO else command_name(self.code)
        return reply_name(self.code) if self.kind == "reply" else ""

    def describe(self) -> tuple[dict[str, Any], dict[str, str] | None, str]:
        """The decoded arguments, the macros, and a note (malformed, not decoded)."""
        macros = _macros(self.macros) if self.macros is not None else None
        if self.payload is None:
            note = self.message
            if self.code not in _STREAMED and self.length > MAX_DECODED:
                note = f"not decoded: more than {MAX_DECODED} data bytes"
            return {"size": self.length}, macros, note
        item = self.item
        if item is None:
            decode = decode_command if self.kind == "command" else decode_reply
            try:
                item = decode(self.code, self.payload)
            except ProtocolError as exc:
                return {"size": self.length}, macros, f"malformed: {exc}"
        if isinstance(item, DefineMacros):
            return {"for": command_name(item.stage)}, _macros(self.payload), self.message
        return arguments(item), macros, self.message


def _macros(payload: bytes) -> dict[str, str]:
    try:
        item = decode_command(_MACRO, payload)
    except ProtocolError:
        return {"?": text_json(payload)}
    assert isinstance(item, DefineMacros)
    return {text_json(name): text_json(value) for name, value in item.macros}


def _flags(value: int, kind: type[enum.IntFlag], every: int) -> str:
    if value == every:
        return f"ALL ({value:#x})"  # what Postfix and Sendmail offer
    return f"{flags_name(value, kind)} ({value:#x})"


def arguments(item: object) -> dict[str, Any]:
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
    for name in _field_names(type(item)):
        value = getattr(item, name)
        if isinstance(value, bytes):
            value = text_json(value)
        elif isinstance(value, tuple):
            value = [text_json(v) if isinstance(v, bytes) else v for v in value]
        elif isinstance(value, enum.Enum):
            value = value.name
        result[name] = value
    return result


_FIELDS: dict[type, tuple[str, ...]] = {}


def _field_names(kind: type) -> tuple[str, ...]:
    names = _FIELDS.get(kind)
    if names is None:
        fields = attrs.fields(kind) if attrs.has(kind) else ()
        names = _FIELDS[kind] = tuple(field.name for field in fields)
    return names


@functools.lru_cache(maxsize=4)
def _clock(second: int) -> str:
    return time.strftime("%H:%M:%S", time.localtime(second))


def format_text(event: Event) -> str:
    """One event as a line of text."""
    second = int(event.time)
    stamp = f"{_clock(second)}.{int((event.time - second) * 1e6):06d} #{event.conn}"
    if event.kind == "violation":
        return f"{stamp} !! {event.side}: {event.message}"
    if event.kind == "error":
        return f"{stamp} !! {event.message}"
    if event.kind not in ("command", "reply"):
        return f"{stamp} -- {event.message}"
    args, macros, note = event.describe()
    parts = [stamp, "MTA> " if event.side == "mta" else "<MIL ", event.name]
    if args:
        parts.append(" ".join(f"{k}={_value(v)}" for k, v in args.items()))
    if macros:
        parts.append("macros: " + " ".join(f"{k}={show(v)}" for k, v in macros.items()))
    if note:
        parts.append(f"({note})")
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
    message = event.message
    if event.kind in ("command", "reply"):
        args, macros, message = event.describe()
        document.update(name=event.name, code=_code_text(event.code), args=args)
        if macros is not None:
            document["macros"] = macros
        if event.answers is not None:
            document["answers"] = event.answers
        if event.ms is not None:
            document["ms"] = round(event.ms, 3)
            document["slow"] = event.slow
    if message:
        document["message"] = message
    return json.dumps(document, ensure_ascii=False)


# --- judging ---------------------------------------------------------------------------------


class Observer:
    """The state one tapped connection needs to judge its traffic.

    `from_mta` and `from_milter` take each direction's bytes with the
    (monotonic) time they arrived and return the `Event` s to show.
    ``pending`` is the command owed a reply and since when.
    """

    def __init__(self, conn: int, *, slow_ms: float | None = None) -> None:
        self.conn = conn
        self.slow_ms = slow_ms
        self.mta = Framer()
        self.milter = Framer()
        self.offer: OptionNegotiation | None = None
        self.negotiated: Negotiated | None = None
        self.pending: int | None = None
        self.since = 0.0
        self.reported = False
        self.macros: bytes | None = None  # a macro packet waiting for its command
        self.commands = 0
        self.replies = 0
        self._opts = 0
        self._actions = 0
        self._body_run = 0

    # --- the MTA's side ------------------------------------------------------------------

    def from_mta(self, data: bytes, now: float) -> list[Event]:
        events: list[Event] = []
        for frame in self.mta.feed(data):
            if frame.code < 0:
                events.append(self._violation("mta", "a packet of length 0 (no command code)"))
            elif frame.code == _MACRO:
                events += self._flush_macros()
                self.macros = frame.payload if frame.payload is not None else b""
            else:
                events += self._command(frame, now)
        return events

    def _command(self, frame: Frame, now: float) -> list[Event]:
        code = frame.code
        event = Event(self.conn, "command", "mta", code, frame.payload, frame.length)
        events = []
        if self.macros is not None:
            if self.macros[:1] == bytes((code,)):
                event.macros, self.macros = self.macros, None
            else:
                events += self._flush_macros()
        events.append(event)
        self.commands += 1
        if self.pending is not None and code in FINAL_REPLIES:
            waited = command_name(self.pending)
            message = f"{command_name(code)} sent while the reply to {waited} is still due"
            events.append(self._violation("mta", message + " (a missing reply)"))
            self.pending = None
        if code == _OPTNEG:
            self._offer(event)
        flag = NO_FLAG.get(code)
        if flag is not None and self._opts & flag:
            message = f"{command_name(code)} sent, but the milter negotiated {flag.name}"
            events.append(self._violation("mta", message))
        silenced = NOREPLY_FLAG.get(code)
        if code in FINAL_REPLIES and not (silenced is not None and self._opts & silenced):
            self.pending, self.since, self.reported = code, now, False
            self._body_run = 0
        return events

    def _offer(self, event: Event) -> None:
        self.negotiated, self._opts, self._actions = None, 0, 0
        if event.payload is None:
            return
        try:
            item = decode_command(_OPTNEG, event.payload)
        except ProtocolError:
            return  # shown as malformed by the writer
        assert isinstance(item, OptionNegotiation)
        self.offer = event.item = item

    def _flush_macros(self) -> list[Event]:
        """A macro packet whose command did not follow (Postfix sends them for skipped steps)."""
        if self.macros is None:
            return []
        payload, self.macros = self.macros, None
        return [Event(self.conn, "command", "mta", _MACRO, payload, len(payload))]

    # --- the milter's side ---------------------------------------------------------------

    def from_milter(self, data: bytes, now: float) -> list[Event]:
        events: list[Event] = []
        for frame in self.milter.feed(data):
            if frame.code < 0:
                events.append(self._violation("milter", "a packet of length 0 (no reply code)"))
            else:
                events += self._reply(frame, now)
        return events

    def _reply(self, frame: Frame, now: float) -> list[Event]:
        code = frame.code
        event = Event(self.conn, "reply", "milter", code, frame.payload, frame.length)
        self.replies += 1
        pending = self.pending
        if pending is None:
            return [event, self._violation("milter", f"{event.name} where no reply is owed")]
        event.answers = command_name(pending)
        event.ms = (now - self.since) * 1000
        event.slow = self.slow_ms is not None and event.ms > self.slow_ms
        if code in FINAL_REPLIES.get(pending, ()):
            self.pending = None
            return [event, *self._final(event)]
        if pending == _EOM and code in EOM_MODIFICATIONS:
            return [event, *self._change(code)]
        message = f"{event.name} is not a valid reply to {event.answers}"
        return [event, self._violation("milter", message)]

    def _final(self, event: Event) -> list[Event]:
        code, payload = event.code, event.payload
        if code == _OPTNEG:
            return self._negotiated(event)
        if code == _SKIP and not self._opts & _SKIP_BIT:
            return [self._violation("milter", "SKIP, but SKIP was not negotiated")]
        if code == _REPLYCODE and payload is not None and payload[:1] not in (b"4", b"5"):
            text = payload.rstrip(b"\0")
            return [self._violation("milter", f"REPLYCODE is not a 4xx/5xx reply: {text!r}")]
        return []

    def _negotiated(self, event: Event) -> list[Event]:
        try:
            reply = decode_reply(_OPTNEG, event.payload or b"")
        except ProtocolError:
            return []  # shown as malformed by the writer
        assert isinstance(reply, OptionNegotiationReply)
        event.item = reply
        self._opts, self._actions = int(reply.opts), int(reply.actions)
        if self.offer is None:
            return [self._violation("milter", "a negotiation reply without an offer")]
        try:
            self.negotiated = check_reply(self.offer, reply)
        except ProtocolError as exc:
            return [self._violation("milter", str(exc))]
        return []

    def _change(self, code: int) -> list[Event]:
        needed = ACTION_OF_REPLY.get(code)
        if needed is not None and not self._actions & needed:
            message = f"{reply_name(code)} needs the {needed.name} action, which was not negotiated"
            return [self._violation("milter", message)]
        if code == _REPLBODY:
            if self._body_run == 2:
                return [self._violation("milter", "REPLBODY chunks must be contiguous")]
            self._body_run = 1
        elif self._body_run == 1 and code != _PROGRESS:
            self._body_run = 2
        return []

    # --- both ------------------------------------------------------------------------------

    def _violation(self, side: str, message: str) -> Event:
        return Event(self.conn, "violation", side, message=message)

    def overdue(self, now: float, limit: float) -> list[Event]:
        """A reply that has not come within ``limit`` seconds (reported once per command)."""
        if self.pending is None or self.reported or now - self.since < limit:
            return []
        self.reported = True
        name = command_name(self.pending)
        return [self._violation("milter", f"no reply to {name} after {limit:g} s")]

    def closed(self, side: str) -> list[Event]:
        """``side`` closed its end: what is left unsaid."""
        events = self._flush_macros() if side == "mta" else []
        if (self.mta if side == "mta" else self.milter).partial:
            events.append(self._violation(side, "closed in the middle of a packet"))
        if side == "milter" and self.pending is not None and self.pending != _OPTNEG:
            name = command_name(self.pending)
            events.append(self._violation("milter", f"closed with the reply to {name} still due"))
            self.pending = None
        return events
