"""Reading messages for `triomilter check`: line ends, folding, mbox, directories, envelopes."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from triomilter._mail import (
    MAX_LINE,
    BodyPiece,
    Client,
    Field,
    HeaderField,
    HeadersEnd,
    LineSplitter,
    Message,
    MessageEnd,
    MessageError,
    MessageParser,
    MessageSource,
    MessageStart,
    addresses,
    client_of,
    header_values,
)


def parse(data: bytes, split: int = 7) -> list[object]:
    """Every event of ``data`` fed in pieces of ``split`` bytes (splits anywhere)."""
    splitter, parser = LineSplitter(), MessageParser()
    events: list[object] = []
    for start in range(0, len(data), split):
        for line in splitter.feed(data[start : start + split]):
            events += parser.line(line)
    for line in splitter.end():
        events += parser.line(line)
    return events + parser.end()


def fields(events: list[object]) -> list[tuple[bytes, bytes]]:
    return [(e.field.name, e.field.value) for e in events if isinstance(e, Field)]


def body(events: list[object]) -> tuple[bytes, bytes]:
    pieces = [e for e in events if isinstance(e, BodyPiece)]
    return b"".join(p.raw for p in pieces), b"".join(p.wire for p in pieces)


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_headers_and_body_in_either_line_end(newline: bytes) -> None:
    data = newline.join(
        [
            b"Subject: hello",
            b"X-Folded: first",
            b"\tsecond",
            b"  third",
            b"X-Empty:",
            b"X-Spaces:    four",
            b"Spaced-Name  : value",
            b"",
            b"line one",
            b"",
            b"line three",
            b"",
        ]
    )
    events = parse(data)
    assert isinstance(events[0], MessageStart)
    assert fields(events) == [
        (b"Subject", b" hello"),
        (b"X-Folded", b" first\n\tsecond\n  third"),  # folds joined by a bare LF
        (b"X-Empty", b""),
        (b"X-Spaces", b"    four"),
        (b"Spaced-Name", b" value"),
    ]
    raw, wire = body(events)
    assert raw == newline.join([b"line one", b"", b"line three", b""])
    assert wire == b"line one\r\n\r\nline three\r\n"  # always CRLF for the milter
    assert HeadersEnd(newline) in events
    assert isinstance(events[-1], MessageEnd)


def test_raw_fields_keep_the_input_bytes() -> None:
    data = b"X-A: 1\r\n\tfolded \xff\r\n\r\nbody"
    (field,) = [e.field for e in parse(data) if isinstance(e, Field)]
    assert field.raw == b"X-A: 1\r\n\tfolded \xff\r\n"
    assert field.value == b" 1\n\tfolded \xff"
    raw, wire = body(parse(data))
    assert (raw, wire) == (b"body", b"body")  # no line end: kept as it came


def test_a_line_that_is_no_header_starts_the_body() -> None:
    events = parse(b"Subject: x\nthis is not a header\nmore\n")
    assert fields(events) == [(b"Subject", b" x")]
    assert HeadersEnd(b"") in events
    assert body(events)[1] == b"this is not a header\r\nmore\r\n"


def test_an_empty_input_is_an_empty_message() -> None:
    assert parse(b"") == [MessageStart(), HeadersEnd(b""), MessageEnd()]


def test_headers_only() -> None:
    events = parse(b"Subject: x\n")
    assert fields(events) == [(b"Subject", b" x")]
    assert events[-2:] == [HeadersEnd(b""), MessageEnd()]


def test_mbox_messages_senders_and_quoting() -> None:
    data = (
        b"From alice@example.org Thu Dec  4 10:00:00 2025\n"
        b"Subject: one\n\n>From the start\n>>From two\nlast\n\n"
        b"From MAILER-DAEMON Thu Dec  4 10:00:01 2025\n"
        b"Subject: two\n\nbody two\n\n"
    )
    events = parse(data, split=5)
    starts = [e for e in events if isinstance(e, MessageStart)]
    assert starts == [MessageStart(b"alice@example.org"), MessageStart(b"MAILER-DAEMON")]
    first, second = b"".join(
        b"\0" if isinstance(e, MessageEnd) else e.raw if isinstance(e, BodyPiece) else b""
        for e in events
    ).split(b"\0")[:2]
    # mboxrd: one '>' less; the empty line before the next From is the separator
    assert first == b"From the start\n>From two\nlast\n"
    assert second == b"body two\n"


def test_long_lines_come_in_pieces() -> None:
    long = b"x" * (MAX_LINE * 2 + 10)
    splitter = LineSplitter()
    lines = splitter.feed(long[:100]) + splitter.feed(long[100:] + b"\r\nend")
    lines += splitter.end()
    assert all(len(line) <= MAX_LINE + 2 for line in lines)
    assert b"".join(lines) == long + b"\r\nend"
    events = parse(b"Subject: x\n\n" + long + b"\r\nend\n", split=MAX_LINE // 3)
    assert body(events)[1] == long + b"\r\nend\r\n"


async def test_source_reads_files_directories_and_stdin(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "b.eml").write_bytes(b"Subject: b\n\nB\n")
    (tmp_path / "dir" / "a.eml").write_bytes(b"Subject: a\r\n\r\nA\r\n")
    (tmp_path / "dir" / ".hidden").write_bytes(b"Subject: hidden\n\n")
    mbox = tmp_path / "box"
    mbox.write_bytes(b"From x@y Thu\nSubject: m1\n\n1\n\nFrom z@y Thu\nSubject: m2\n\n2\n")
    source = MessageSource(
        [str(tmp_path / "dir"), str(mbox), "-"], stdin=io.BytesIO(b"Subject: in\n\nstdin\n")
    )
    seen: list[tuple[str, bytes, bytes, bytes | None]] = []
    while (message := await source.next_message()) is not None:
        assert isinstance(message, Message)
        pieces = []
        while (piece := await source.body_piece()) is not None:
            pieces.append(piece.raw)
        seen.append(
            (
                message.name.replace(str(tmp_path), ""),
                message.newline,
                b"".join(pieces),
                message.mbox_sender,
            )
        )
    await source.aclose()
    assert seen == [
        ("/dir/a.eml", b"\r\n", b"A\r\n", None),
        ("/dir/b.eml", b"\n", b"B\n", None),
        ("/box#1", b"\n", b"1\n", b"x@y"),
        ("/box#2", b"\n", b"2\n", b"z@y"),
        ("-", b"\n", b"stdin\n", None),
    ]


async def test_unread_bodies_are_skipped() -> None:
    data = b"From a@b\nSubject: 1\n\n" + b"x\n" * 1000 + b"\nFrom c@d\nSubject: 2\n\ntwo\n"
    source = MessageSource(["-"], stdin=io.BytesIO(data))
    first = await source.next_message()
    second = await source.next_message()  # the first body is read past
    assert first is not None and second is not None
    assert header_values(second.fields, b"subject") == [b"2"]
    assert (await source.body_piece()) == BodyPiece(b"two\n", b"two\r\n")


def test_missing_inputs_are_reported(tmp_path: Path) -> None:
    with pytest.raises(MessageError, match="no such file"):
        MessageSource([str(tmp_path / "nope.eml")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(MessageError, match="no files"):
        MessageSource([str(tmp_path / "empty")])


def received(*values: bytes) -> list[HeaderField]:
    data = b"".join(b"Received: " + v + b"\n" for v in values) + b"\n"
    return [e.field for e in parse(data) if isinstance(e, Field)]


@pytest.mark.parametrize(
    ("value", "client"),
    [
        (
            b"from mail.example.org (mail.example.org [192.0.2.10])\n\tby mx (Postfix)",
            Client("mail.example.org", "mail.example.org", "192.0.2.10"),
        ),
        (
            b"from helo.example (unknown [192.0.2.11]) by mx (Postfix)",
            Client("helo.example", "[192.0.2.11]", "192.0.2.11"),
        ),
        (
            b"from host.example ([IPv6:2001:db8::1]) by mx",
            Client("host.example", "[2001:db8::1]", "2001:db8::1"),
        ),
        (
            b"from host.example ([192.0.2.12] helo=claimed.example) by mx (Exim 4.96)",
            Client("claimed.example", "[192.0.2.12]", "192.0.2.12"),
        ),
        (
            b"from [192.0.2.13] (helo=claimed.example) by mx (Exim 4.96)",
            Client("claimed.example", "[192.0.2.13]", "192.0.2.13"),
        ),
    ],
)
def test_the_client_of_a_received_header(value: bytes, client: Client) -> None:
    assert client_of(received(value)) == client


def test_loopback_hops_are_skipped() -> None:
    fields = received(
        b"from localhost (localhost [127.0.0.1]) by mx (Postfix)",
        b"by mx (Postfix, from userid 0)",
        b"from out.example (out.example [198.51.100.9]) by mx (Postfix)",
    )
    assert client_of(fields) == Client("out.example", "out.example", "198.51.100.9")
    assert client_of(received(b"from localhost (localhost [127.0.0.1])")) is None


def test_addresses() -> None:
    values = [b' "Example, A" <a@example.org>, b@example.org', b"=?utf-8?q?x?= <c@example.org>"]
    assert addresses(values) == [b"a@example.org", b"b@example.org", b"c@example.org"]
    assert addresses([" Jürgen <jürgen@beispiel.de>".encode()]) == ["jürgen@beispiel.de".encode()]
    assert addresses([b"undisclosed-recipients:;"]) == []
