"""The tap's decoding and judging of both directions (sans-IO), and its bounded output."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from typing import cast

import pytest
import trio

from triomilter._tap import FLUSH_TIMEOUT, Output
from triomilter._tap_observer import (
    MAX_DECODED,
    Event,
    Framer,
    Observer,
    format_json,
    format_text,
)
from triomilter.protocol import (
    ABORT,
    ALL_ACTIONS,
    ALL_PROTOCOL_OPTS,
    CONTINUE,
    DATA,
    PROGRESS,
    QUIT,
    SKIP,
    Actions,
    AddHeader,
    AddRecipient,
    AddressFamily,
    Body,
    Command,
    Connect,
    DefineMacros,
    EndOfMessage,
    Header,
    Helo,
    Mail,
    OptionNegotiation,
    OptionNegotiationReply,
    ProtocolOpts,
    Rcpt,
    ReplaceBody,
    Reply,
    ReplyWithCode,
)
from triomilter.protocol._wire import packet

OFFER = OptionNegotiation(6, ALL_ACTIONS, ALL_PROTOCOL_OPTS)
CONNECT = Connect(b"mx.example", AddressFamily.INET, 25, b"192.0.2.1")


def session(
    actions: Actions = Actions.ADD_HEADER, opts: ProtocolOpts = ProtocolOpts.NONE
) -> Observer:
    """An observer past a negotiation that agreed on ``actions`` and ``opts``."""
    observer = Observer(1, slow_ms=100)
    assert observer.from_mta(OFFER.encode(), 0.0)[0].name == "OPTNEG"
    reply = OptionNegotiationReply(6, actions, opts).encode()
    assert [e.kind for e in observer.from_milter(reply, 0.001)] == ["reply"]
    return observer


def violations(events: list[Event]) -> list[str]:
    return [e.message for e in events if e.kind == "violation"]


def test_a_clean_session_in_any_split() -> None:
    commands: list[Command] = [
        OFFER,
        DefineMacros(ord("C"), ((b"j", b"mx"), (b"{daemon_name}", b"mx"))),
        CONNECT,
        Helo(b"client.example"),
        Mail((b"<a@example.org>", b"SIZE=10")),
        Rcpt((b"<b@example.net>",)),
        DATA,
        Header(b"Subject", b"hello \xff"),
        Body(b"x" * 70000),
        EndOfMessage(),
        ABORT,
        QUIT,
    ]
    replies: list[list[Reply]] = [
        [OptionNegotiationReply(6, Actions.ADD_HEADER, ProtocolOpts.NONE)],
        [],
        *([cast(Reply, CONTINUE)] for _ in range(7)),
        [AddHeader(b"X-Seen", b"yes"), PROGRESS, CONTINUE],
        [],
        [],
    ]
    for split in (1, 3, 1000, 100000):
        observer = Observer(7)
        events: list[Event] = []
        now = 0.0
        for command, answer in zip(commands, replies, strict=True):
            data = command.encode()
            for start in range(0, len(data), split):
                events += observer.from_mta(data[start : start + split], now)
            data = b"".join(reply.encode() for reply in answer)
            now += 0.001
            for start in range(0, len(data), split):
                events += observer.from_milter(data[start : start + split], now)
        assert violations(events) == []
        names = [e.name for e in events if e.kind == "command"]
        assert names == [
            "OPTNEG",
            "CONNECT",
            "HELO",
            "MAIL",
            "RCPT",
            "DATA",
            "HEADER",
            "BODY",
            "EOM",
            "ABORT",
            "QUIT",
        ]
        by_name = {e.name: e.describe() for e in events if e.kind == "command"}
        assert by_name["CONNECT"][1] == {"j": "mx", "{daemon_name}": "mx"}
        assert by_name["CONNECT"][0] == {
            "hostname": "mx.example",
            "family": "INET",
            "port": 25,
            "address": "192.0.2.1",
        }
        assert by_name["HEADER"][0] == {"name": "Subject", "value": "hello \\xff"}
        assert by_name["MAIL"][0] == {"args": ["<a@example.org>", "SIZE=10"]}
        assert by_name["BODY"][0] == {"size": 70000}  # streamed past, never held
        assert by_name["OPTNEG"][0]["protocol"] == "ALL (0x1fffff)"
        answers = [(e.name, e.answers) for e in events if e.kind == "reply"]
        assert answers[-3:] == [("ADDHEADER", "EOM"), ("PROGRESS", "EOM"), ("CONTINUE", "EOM")]
        assert all(e.ms is not None for e in events if e.kind == "reply")


def test_a_reply_where_none_is_owed() -> None:
    observer = session(opts=ProtocolOpts.NOREPLY_CONNECT)
    assert observer.from_mta(CONNECT.encode(), 1.0)[0].name == "CONNECT"
    events = observer.from_milter(CONTINUE.encode(), 1.1)  # NOREPLY_CONNECT: not owed
    assert violations(events) == ["CONTINUE where no reply is owed"]


def test_a_missing_reply() -> None:
    observer = session()
    observer.from_mta(CONNECT.encode(), 1.0)
    events = observer.from_mta(Helo(b"x").encode(), 2.0)
    assert violations(events) == [
        "HELO sent while the reply to CONNECT is still due (a missing reply)"
    ]
    assert observer.overdue(2.5, 30.0) == []
    late = observer.overdue(40.0, 30.0)
    assert violations(late) == ["no reply to HELO after 30 s"]
    assert observer.overdue(50.0, 30.0) == []  # reported once
    closed = observer.closed("milter")
    assert violations(closed) == ["closed with the reply to HELO still due"]


def test_changes_need_their_action_and_end_of_message() -> None:
    observer = session(actions=Actions.ADD_HEADER)
    observer.from_mta(CONNECT.encode(), 0.0)
    events = observer.from_milter(AddHeader(b"X", b"y").encode(), 0.1)
    assert violations(events) == ["ADDHEADER is not a valid reply to CONNECT"]
    observer.from_milter(CONTINUE.encode(), 0.2)
    observer.from_mta(EndOfMessage().encode(), 1.0)
    events = observer.from_milter(
        AddRecipient(b"<x@y>").encode()
        + ReplaceBody(b"a").encode()
        + AddHeader(b"X", b"y").encode()
        + ReplaceBody(b"b").encode()
        + CONTINUE.encode(),
        1.5,
    )
    assert violations(events) == [
        "ADDRCPT needs the ADD_RECIPIENT action, which was not negotiated",
        "REPLBODY needs the REPLACE_BODY action, which was not negotiated",
        "REPLBODY needs the REPLACE_BODY action, which was not negotiated",
    ]
    observer = session(actions=Actions.REPLACE_BODY | Actions.ADD_HEADER)
    observer.from_mta(EndOfMessage().encode(), 1.0)
    events = observer.from_milter(
        ReplaceBody(b"a").encode() + AddHeader(b"X", b"y").encode() + ReplaceBody(b"b").encode(),
        1.1,
    )
    assert violations(events) == ["REPLBODY chunks must be contiguous"]


def test_unknown_codes_malformed_and_empty_packets() -> None:
    observer = session()
    events = observer.from_mta(packet(ord("Z"), b"junk") + packet(ord("C"), b"no-nul"), 0.0)
    assert [(e.name, e.describe()[2]) for e in events] == [
        ("unknown command 'Z'", "malformed: unknown command b'Z' is not a milter command"),
        ("CONNECT", "malformed: CONNECT ('C'): expected hostname\\0 and a family byte"),
    ]
    events = observer.from_milter(packet(ord("Z")) + b"\0\0\0\0" + CONTINUE.encode(), 0.1)
    assert [e.name or e.message for e in events] == [
        "unknown reply 'Z'",
        "unknown reply 'Z' is not a valid reply to CONNECT",
        "a packet of length 0 (no reply code)",
        "CONTINUE",
    ]


def test_oversized_packets_are_counted_not_held() -> None:
    observer = session()
    huge = (MAX_DECODED + 10).to_bytes(4, "big") + b"L" + b"h" * (MAX_DECODED + 9)
    events: list[Event] = []
    for start in range(0, len(huge), 4096):
        events += observer.from_mta(huge[start : start + 4096], 0.0)
    (event,) = events
    args, _, note = event.describe()
    assert args == {"size": MAX_DECODED + 9}
    assert note == f"not decoded: more than {MAX_DECODED} data bytes"


def test_garbage_is_framed_anyway() -> None:
    observer = Observer(1)
    events = observer.from_mta(b"GET / HTTP/1.0\r\n\r\n", 0.0)
    assert events == []  # a 1.2 GB "packet" starts: skipped as it streams past, not held
    closed = observer.closed("mta")
    assert violations(closed) == ["closed in the middle of a packet"]


def test_skip_and_reply_codes_are_checked() -> None:
    observer = session()
    observer.from_mta(Body(b"x").encode(), 0.0)
    assert violations(observer.from_milter(SKIP.encode(), 0.1)) == [
        "SKIP, but SKIP was not negotiated"
    ]
    observer.from_mta(Body(b"x").encode(), 0.2)
    events = observer.from_milter(ReplyWithCode(b"250 fine").encode(), 0.3)
    assert violations(events) == ["REPLYCODE is not a 4xx/5xx reply: b'250 fine'"]


def test_a_negotiation_reply_beyond_the_offer() -> None:
    observer = Observer(1)
    observer.from_mta(OptionNegotiation(6, Actions.ADD_HEADER, ProtocolOpts(0x3F)).encode(), 0.0)
    reply = OptionNegotiationReply(6, Actions.QUARANTINE, ProtocolOpts.NONE).encode()
    assert violations(observer.from_milter(reply, 0.1)) == [
        "OPTNEG reply: actions not offered: <Actions.QUARANTINE: 32>"
    ]


def test_slow_replies_are_flagged() -> None:
    observer = session()
    observer.from_mta(CONNECT.encode(), 1.0)
    (event,) = observer.from_milter(CONTINUE.encode(), 1.5)
    assert (event.ms, event.slow) == (500.0, True)
    observer.from_mta(Helo(b"x").encode(), 2.0)
    (event,) = observer.from_milter(CONTINUE.encode(), 2.001)
    assert event.slow is False


def test_macros_of_a_command_that_did_not_come() -> None:
    observer = session(opts=ProtocolOpts.NO_HELO)
    events = observer.from_mta(
        DefineMacros(ord("H"), ()).encode() + DefineMacros(ord("M"), ((b"i", b"Q1"),)).encode(),
        0.0,
    )
    assert [(e.name, *e.describe()) for e in events] == [("MACRO", {"for": "HELO"}, {}, "")]
    events = observer.from_mta(Mail((b"<a@b>",)).encode(), 0.0)
    assert events[0].describe()[1] == {"i": "Q1"}
    events = observer.from_mta(Helo(b"x").encode(), 1.0)
    assert "HELO sent, but the milter negotiated NO_HELO" in violations(events)


def test_framer_any_split() -> None:
    data = CONNECT.encode() + b"\0\0\0\0" + Body(b"y" * 100).encode() + Helo(b"h").encode()
    for split in range(1, 12):
        framer = Framer()
        frames = []
        for start in range(0, len(data), split):
            frames += framer.feed(data[start : start + split])
        assert [(f.code, f.length) for f in frames] == [
            (ord("C"), 24),
            (-1, 0),
            (ord("B"), 100),
            (ord("H"), 2),
        ]
        assert frames[2].payload is None and not framer.partial


def test_text_and_json_lines() -> None:
    event = Event(3, "reply", "milter", ord("y"), b"550 no\0", 7, answers="RCPT")
    event.ms, event.slow, event.time = 12.5, True, 0.25
    assert format_text(event).endswith(" #3 <MIL  REPLYCODE text='550 no' [12.50 ms SLOW]")
    assert format_json(event) == (
        '{"time": 0.25, "conn": 3, "type": "reply", "from": "milter", "name": "REPLYCODE", '
        '"code": "y", "args": {"text": "550 no"}, "answers": "RCPT", "ms": 12.5, "slow": true}'
    )
    violation = Event(3, "violation", "milter", message="CONTINUE where no reply is owed")
    assert format_text(violation).endswith("#3 !! milter: CONTINUE where no reply is owed")


class _Blocking(io.StringIO):
    """A stream whose writes wait until released (a reader that does not keep up)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.release.wait(10)
        return super().write(text)


@pytest.fixture
def blocking() -> Iterator[_Blocking]:
    stream = _Blocking()
    yield stream
    stream.release.set()


async def test_output_drops_lines_rather_than_wait(blocking: _Blocking) -> None:
    output = Output(blocking, format_text, size=5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(output.run)
        await trio.testing.wait_all_tasks_blocked()
        events = [Event(1, "open", message=f"line {n}") for n in range(50)]
        output.emit(events)  # never blocks
        assert output.dropped > 0
        blocking.release.set()
        with trio.fail_after(10):
            while "line" not in blocking.getvalue():  # noqa: ASYNC110 - a thread writes it
                await trio.sleep(0.01)
        output.emit([Event(1, "open", message="after")])
        nursery.cancel_scope.cancel()
    text = blocking.getvalue()
    assert "line(s) dropped: output too slow" in text
    assert text.rstrip().endswith("after")
    assert text.count("line ") < 50


async def test_output_stops_even_if_the_reader_never_reads(blocking: _Blocking) -> None:
    """A write stuck on a full pipe neither blocks the events nor the tap's exit."""
    output = Output(blocking, format_text, size=5)
    with trio.fail_after(FLUSH_TIMEOUT + 5):  # a bound, not a measurement
        async with trio.open_nursery() as nursery:
            nursery.start_soon(output.run)
            output.emit([Event(1, "open", message="stuck")])
            await trio.testing.wait_all_tasks_blocked()  # the writer waits in its write
            output.emit([Event(1, "open", message=f"line {n}") for n in range(20)])
            nursery.cancel_scope.cancel()
    assert output.dropped > 0
