"""Real traffic behind Postfix and behind Sendmail, with a triomilter milter:
many concurrent sessions, several messages per session."""

from __future__ import annotations

import concurrent.futures
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

from ._milter_runner import Recorder, header_values, split_first_header
from .capture import CaptureServer
from .mta import Mta
from .scenarios import SENDER


@attrs.define
class Session:
    subject: str = ""
    rcpts: list[str] = attrs.field(factory=list)


def test_concurrent_sessions(mta: Mta, capture: CaptureServer) -> None:
    """20 SMTP sessions at once, all held open until every one has reached
    DATA, so the milter serves 20 connections concurrently; each message gets
    its own filtering (no state leaks between connections)."""
    count = 20
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
        with mta.smtp(timeout=30) as s:
            s.ehlo()
            assert s.mail(SENDER)[0] == 250
            assert s.rcpt(f"c{i}@example.test")[0] == 250
            barrier.wait()  # every session is open, so is every milter connection
            return s.data(f"Subject: message {i}\r\n\r\nbody {i}\r\n".encode())

    with (
        mta.serving(milter),
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


def test_several_messages_on_one_connection(mta: Mta, capture: CaptureServer) -> None:
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
    with mta.serving(milter), mta.smtp() as s:
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
        assert queue_id.decode() == mta.queue_id_of(data)
        queue_ids.add(queue_id)
    assert len(queue_ids) == 3
    # MAIL sees this message's sender and no recipient of the previous one.
    assert rec.values("mail") == [(f"m{i}@example.test", None) for i in (1, 2, 3, 4)]
    assert rec.values("close") == [4]
    # on_abort runs for the abandoned message only (Postfix also sends an
    # abort after each completed message, which is not a message to abort).
    assert rec.stages() == ["connect", "mail", "mail", "abort", "mail", "mail", "close"]
