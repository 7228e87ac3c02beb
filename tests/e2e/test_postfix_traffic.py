"""Real traffic through Postfix and a triomilter milter: 8-bit data and a
multi-megabyte body (concurrent sessions and several messages per session,
the same behind both MTAs: test_traffic_behind_mta.py)."""

from __future__ import annotations

import hashlib

from triomilter import (
    Actions,
    Context,
    Milter,
    Status,
    on_eom,
    on_header,
    on_mail,
)

from ._milter_runner import Recorder, header_values, split_first_header, use_milter
from .capture import CaptureServer
from .postfix import PrivatePostfix
from .scenarios import EIGHT_BIT_HEADERS, EIGHT_BIT_MESSAGE, SENDER, hashing_milter


def test_8bit_headers_with_bytes_handlers(postfix: PrivatePostfix, capture: CaptureServer) -> None:
    rec = Recorder()

    @on_mail
    async def mail(ctx: Context[list[bytes]], args: list[bytes]) -> Status:
        rec.add("mail", args)
        ctx.data = []
        return Status.CONTINUE

    @on_header
    async def header(ctx: Context[list[bytes]], name: bytes, value: bytes) -> Status:
        rec.add("header", (name, value))
        assert ctx.data is not None
        ctx.data.append(value)
        return Status.CONTINUE

    @on_eom
    async def eom(ctx: Context[list[bytes]]) -> Status:
        assert ctx.data is not None
        # Echo the raw values: Postfix must deliver them byte for byte.
        for value in ctx.data:
            await ctx.api.add_header(b"X-Echo", value)
        return Status.CONTINUE

    milter = Milter("bytes", handlers=[mail, header, eom], actions=Actions.ADD_HEADER)
    sender = "j\u00f6rg@example.test"
    with use_milter(postfix, milter), postfix.smtp() as s:
        s.sendmail(sender, ["r@example.test"], EIGHT_BIT_MESSAGE, ["SMTPUTF8", "BODY=8BITMIME"])
    (msg,) = capture.wait_for(1)
    assert rec.one("mail")[0] == b"<j\xc3\xb6rg@example.test>"
    assert rec.values("header") == [
        (b"Subject", b"caf\xe9 cr\xe8me br\xfbl\xe9e"),
        (b"X-Utf8", b"\xc3\xa9t\xc3\xa9 \xe2\x9c\x93"),
        (b"X-Folded-8bit", b"\xff\xfe first\n\t\x80 second"),
    ]
    _, rest = split_first_header(msg.data)
    assert rest == (
        EIGHT_BIT_HEADERS
        + b"X-Echo: caf\xe9 cr\xe8me br\xfbl\xe9e\r\n"
        + b"X-Echo: \xc3\xa9t\xc3\xa9 \xe2\x9c\x93\r\n"
        + b"X-Echo: \xff\xfe first\r\n\t\x80 second\r\n"
        + b"\r\nbody \xe9\r\n"
    )


def test_str_handler_gets_tempfail_for_non_utf8(
    postfix: PrivatePostfix, capture: CaptureServer
) -> None:
    """A ``str`` parameter gets UTF-8 text; bytes that are not UTF-8 mean the
    handler is not called and the stage answers TEMPFAIL."""
    rec = Recorder()

    @on_mail
    async def mail(ctx: Context[object], args: list[str]) -> Status:
        rec.add("mail", args[0])
        return Status.CONTINUE

    @on_header
    async def header(ctx: Context[object], name: str, value: str) -> Status:
        rec.add("header", (name, value))
        return Status.CONTINUE

    @on_eom
    async def eom(ctx: Context[object]) -> Status:
        rec.add("eom")
        await ctx.api.add_header("X-Seen", "utf-8 only")
        return Status.CONTINUE

    milter = Milter("text", handlers=[mail, header, eom], actions=Actions.ADD_HEADER)
    utf8_message = b"X-Utf8: \xc3\xa9t\xc3\xa9\r\n\r\nbody\r\n"
    with use_milter(postfix, milter), postfix.smtp() as s:
        s.ehlo()
        assert s.mail("a@example.test")[0] == 250
        assert s.rcpt("r@example.test")[0] == 250
        code, text = s.data(EIGHT_BIT_MESSAGE)
        assert (code, text) == (451, b"4.7.1 Service unavailable - try again later")
        # Valid UTF-8 8-bit data, sender included, is fine for str handlers.
        s.sendmail("j\u00f6rg@example.test", ["r@example.test"], utf8_message, ["SMTPUTF8"])
    (msg,) = capture.wait_for(1)
    assert rec.values("mail") == ["<a@example.test>", "<j\u00f6rg@example.test>"]
    # The latin-1 Subject never reached the handler; the UTF-8 header did.
    assert rec.values("header") == [("X-Utf8", "\u00e9t\u00e9")]
    assert rec.stages().count("eom") == 1
    _, rest = split_first_header(msg.data)
    assert rest == b"X-Utf8: \xc3\xa9t\xc3\xa9\r\nX-Seen: utf-8 only\r\n\r\nbody\r\n"
    assert capture.wait_quiet(0.2) == [msg]


def test_multi_megabyte_body(postfix: PrivatePostfix, capture: CaptureServer) -> None:
    line = bytes(range(0x20, 0x7F)) + b"\xc3\xa9\xff\r\n"
    body = line * (5 * 1024 * 1024 // len(line)) + b"." * 2000 + b"\r\n"
    headers = b"Subject: five megabytes\r\n"
    with use_milter(postfix, hashing_milter()), postfix.smtp(timeout=60) as s:
        s.sendmail(SENDER, ["big@example.test"], headers + b"\r\n" + body, ["BODY=8BITMIME"])
    (msg,) = capture.wait_for(1, timeout=60)
    assert len(body) > 5_000_000
    assert msg.body == body
    assert header_values(msg.data, b"X-Body-Size") == [str(len(body)).encode()]
    assert header_values(msg.data, b"X-Body-SHA256") == [hashlib.sha256(body).hexdigest().encode()]
    (chunks,) = header_values(msg.data, b"X-Body-Chunks")
    assert int(chunks) >= len(body) // 65535
