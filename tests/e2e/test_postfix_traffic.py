"""Real traffic through Postfix and a triomilter milter: 8-bit data, a
multi-megabyte body, many concurrent sessions, several messages per session."""

from __future__ import annotations

import concurrent.futures
import hashlib
import re
import threading

import attrs

from triomilter import (
    Actions,
    Context,
    Milter,
    SocketInfo,
    Status,
    on_abort,
    on_close,
    on_connect,
    on_eom,
    on_header,
    on_mail,
    on_rcpt,
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


@attrs.define
class Session:
    subject: str = ""
    rcpts: list[str] = attrs.field(factory=list)


def test_concurrent_sessions(postfix: PrivatePostfix, capture: CaptureServer) -> None:
    """24 SMTP sessions at once, all held open until every one has reached
    DATA, so the milter serves 24 connections concurrently; each message gets
    its own filtering (no state leaks between connections)."""
    count = 24
    lock = threading.Lock()
    open_now = 0
    most_open = 0

    @on_connect
    async def connect(ctx: Context[Session], hostname: str, address: SocketInfo | None) -> Status:
        nonlocal open_now, most_open
        with lock:
            open_now += 1
            most_open = max(most_open, open_now)
        ctx.data = Session()
        return Status.CONTINUE

    @on_rcpt
    async def rcpt(ctx: Context[Session], args: list[str]) -> Status:
        assert ctx.data is not None
        ctx.data.rcpts.append(args[0])
        return Status.CONTINUE

    @on_header
    async def header(ctx: Context[Session], name: str, value: str) -> Status:
        assert ctx.data is not None
        if name == "Subject":
            ctx.data.subject = value
        return Status.CONTINUE

    @on_eom
    async def eom(ctx: Context[Session]) -> Status:
        assert ctx.data is not None
        await ctx.api.add_header("X-Filtered", f"{ctx.data.subject} for {ctx.data.rcpts[0]}")
        return Status.CONTINUE

    @on_close
    async def close(ctx: Context[Session]) -> None:
        nonlocal open_now
        with lock:
            open_now -= 1

    milter = Milter(
        "concurrent", handlers=[connect, rcpt, header, eom, close], actions=Actions.ADD_HEADER
    )
    barrier = threading.Barrier(count, timeout=30)

    def send(i: int) -> tuple[int, bytes]:
        with postfix.smtp(timeout=30) as s:
            s.ehlo()
            assert s.mail(SENDER)[0] == 250
            assert s.rcpt(f"c{i}@example.test")[0] == 250
            barrier.wait()  # every session is open, so is every milter connection
            return s.data(f"Subject: message {i}\r\n\r\nbody {i}\r\n".encode())

    with (
        use_milter(postfix, milter),
        concurrent.futures.ThreadPoolExecutor(max_workers=count) as pool,
    ):
        futures = [pool.submit(send, i) for i in range(count)]
        replies = [future.result(timeout=60) for future in futures]
        msgs = capture.wait_for(count, timeout=30)
    assert [code for code, _ in replies] == [250] * count
    assert most_open == count
    assert len(msgs) == count
    for msg in msgs:
        (address,) = msg.rcpt_tos
        i = int(address[1:].split("@")[0])
        _, rest = split_first_header(msg.data)
        filtered = f"X-Filtered: message {i} for <{address}>\r\n"
        assert rest == f"Subject: message {i}\r\n{filtered}\r\nbody {i}\r\n".encode()
    assert capture.errors == []


@attrs.define
class Connection:
    messages: int = 0
    rcpts: list[str] = attrs.field(factory=list)  # of the current message


def test_several_messages_on_one_connection(
    postfix: PrivatePostfix, capture: CaptureServer
) -> None:
    """``ctx.data`` lives for the connection; each message starts afresh
    (recipients collected per message, per-message macros like ``i``)."""
    rec = Recorder()

    @on_connect
    async def connect(
        ctx: Context[Connection], hostname: str, address: SocketInfo | None
    ) -> Status:
        rec.add("connect", ctx.connection_id)
        ctx.data = Connection()
        return Status.CONTINUE

    @on_mail
    async def mail(ctx: Context[Connection], args: list[str]) -> Status:
        assert ctx.data is not None
        ctx.data.messages += 1
        ctx.data.rcpts = []
        rec.add("mail", (ctx.api.macro_value("{mail_addr}"), ctx.api.macro_value("{rcpt_addr}")))
        return Status.CONTINUE

    @on_rcpt
    async def rcpt(ctx: Context[Connection], args: list[str]) -> Status:
        assert ctx.data is not None
        ctx.data.rcpts.append(args[0])
        return Status.CONTINUE

    @on_eom
    async def eom(ctx: Context[Connection]) -> Status:
        assert ctx.data is not None
        await ctx.api.add_header("X-Message-Number", str(ctx.data.messages))
        await ctx.api.add_header("X-Recipients", ", ".join(ctx.data.rcpts))
        await ctx.api.add_header("X-Queue-Id", ctx.api.macro_value("i") or "none")
        await ctx.api.add_header("X-Connection", ctx.connection_id)
        return Status.CONTINUE

    @on_abort
    async def abort(ctx: Context[Connection]) -> None:
        rec.add("abort")

    @on_close
    async def close(ctx: Context[Connection]) -> None:
        assert ctx.data is not None
        rec.add("close", ctx.data.messages)

    milter = Milter(
        "per-connection",
        handlers=[connect, mail, rcpt, eom, abort, close],
        actions=Actions.ADD_HEADER,
    )
    with use_milter(postfix, milter), postfix.smtp() as s:
        s.sendmail("m1@example.test", ["a@example.test", "b@example.test"], b"\r\none\r\n")
        # An abandoned message: MAIL, RCPT, then RSET.
        s.mail("m2@example.test")
        s.rcpt("c@example.test")
        s.rset()
        s.sendmail("m3@example.test", ["d@example.test"], b"\r\nthree\r\n")
        s.sendmail("m4@example.test", ["e@example.test"], b"\r\nfour\r\n")
        s.quit()
        msgs = capture.wait_for(3)
        rec.wait_for("close")

    by_sender = {m.mail_from: m for m in msgs}
    assert sorted(by_sender) == ["m1@example.test", "m3@example.test", "m4@example.test"]
    (connection_id,) = rec.values("connect")
    queue_ids = set()
    for sender, number, rcpts in (
        ("m1@example.test", b"1", b"<a@example.test>, <b@example.test>"),
        ("m3@example.test", b"3", b"<d@example.test>"),
        ("m4@example.test", b"4", b"<e@example.test>"),
    ):
        data = by_sender[sender].data
        assert header_values(data, b"X-Message-Number") == [number]
        assert header_values(data, b"X-Recipients") == [rcpts]
        assert header_values(data, b"X-Connection") == [connection_id.encode()]
        (queue_id,) = header_values(data, b"X-Queue-Id")
        assert re.search(rb"with ESMTP id " + re.escape(queue_id) + rb"\b", data)
        queue_ids.add(queue_id)
    assert len(queue_ids) == 3
    # MAIL sees this message's sender and no recipient of the previous one.
    assert rec.values("mail") == [(f"m{i}@example.test", None) for i in (1, 2, 3, 4)]
    assert rec.values("close") == [4]
    # on_abort runs for the abandoned message only (Postfix also sends an
    # abort after each completed message, which is not a message to abort).
    assert rec.stages() == ["connect", "mail", "mail", "abort", "mail", "mail", "close"]
