"""A handler panic (SPEC §2.1), step by step, over real sockets.

A: its handler raises -> its command is answered TEMPFAIL.
B: opened before, its handler is blocked -> keeps the panic grace open.
C: opened before, idle -> its next command is TEMPFAIL and no handler runs.
New connections are not served (the listener is closed). When B's handler
returns, B is answered TEMPFAIL and serve() raises MilterPanic from the
original exception. on_abort/on_close never run after the panic.
"""

from __future__ import annotations

import errno
import socket as stdsocket

import pytest
import trio

from triomilter import (
    Context,
    Milter,
    MilterPanic,
    SocketInfo,
    Status,
    on_abort,
    on_close,
    on_connect,
    on_helo,
    on_mail,
    on_rcpt,
)
from triomilter.protocol import Continue, Mail, Rcpt, Tempfail

from ._mta import RawMta
from ._support import TIMEOUT, served, wait_until


class Scenario:
    """A milter whose handlers record their calls; some block or raise on demand."""

    def __init__(self) -> None:
        self.boom = RuntimeError("boom")
        self.calls: list[str] = []
        self.blocked = trio.Event()
        self.release = trio.Event()
        self.unblocked = False

        @on_connect
        async def connect(ctx: Context[None], hostname: str, address: SocketInfo | None) -> Status:
            self.calls.append(f"connect {hostname}")
            return Status.CONTINUE

        @on_helo
        async def helo(ctx: Context[None], hostname: str) -> Status:
            self.calls.append(f"helo {hostname}")
            if hostname == "panic":
                raise self.boom
            return Status.CONTINUE

        @on_mail
        async def mail(ctx: Context[None], args: list[str]) -> Status:
            self.calls.append(f"mail {args[0]}")
            return Status.CONTINUE

        @on_rcpt
        async def rcpt(ctx: Context[None], args: list[str]) -> Status:
            self.calls.append(f"rcpt {args[0]}")
            if args[0] == "<block@example.net>":
                self.blocked.set()
                await self.release.wait()
                self.unblocked = True
            return Status.CONTINUE

        @on_abort
        async def abort(ctx: Context[None]) -> None:
            self.calls.append("abort")

        @on_close
        async def close(ctx: Context[None]) -> None:
            self.calls.append("close")

        self.milter = Milter("panicky", handlers=[connect, helo, mail, rcpt, abort, close])


def port_is_free(port: int) -> bool:
    """Whether nothing listens on 127.0.0.1:``port`` any more (a bind would succeed)."""
    with stdsocket.socket(stdsocket.AF_INET, stdsocket.SOCK_STREAM) as sock:
        sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
        return True


async def test_panic_step_by_step() -> None:
    s = Scenario()
    async with served(s.milter, panic_grace=3 * TIMEOUT) as srv:
        with trio.fail_after(TIMEOUT):
            port = srv.address[1]
            # B and C connect before the panic.
            b = await RawMta.to(srv.address)
            await b.negotiate()
            assert await b.connect("b-host") == Continue()
            assert await b.helo("b") == Continue()
            assert await b.mail("<b@example.org>") == Continue()
            c = await RawMta.to(srv.address)
            await c.negotiate()
            assert await c.connect("c-host") == Continue()
            assert await c.helo("c") == Continue()
            # B's RCPT handler blocks (B is inside a message).
            await b.send_raw(b.mta.send(Rcpt((b"<block@example.net>",))))
            await s.blocked.wait()

            # A panics: its own command is answered TEMPFAIL.
            a = await RawMta.to(srv.address)
            await a.negotiate()
            assert await a.connect("a-host") == Continue()
            assert await a.helo("panic") == Tempfail()
            assert s.calls[-1] == "helo panic"
            calls_at_panic = len(s.calls)

            # C, idle until now: TEMPFAIL for its next command, no handler runs.
            assert await c.final(Mail((b"<c@example.org>",))) == Tempfail()
            # A too: every later command is TEMPFAIL without a handler.
            assert await a.mail("<a@example.org>") == Tempfail()
            assert s.calls[calls_at_panic:] == []

            # The listener closes: new connections are refused, never served.
            await wait_until(lambda: port_is_free(port))
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", port)

            # C leaves: the server ends the connection without on_abort/on_close.
            await c.stream.send_eof()
            assert await c.read_until_closed() == b""

            # B's handler is still running: the grace keeps serve() alive.
            assert not srv.done.is_set()
            assert not s.unblocked
            s.release.set()
            # B's command gets TEMPFAIL although its handler said CONTINUE.
            assert await b.replies() == [Tempfail()]
            assert s.unblocked
            # Then serve() raises MilterPanic from the handler's exception.
            await srv.wait()
            assert isinstance(srv.error, MilterPanic)
            assert srv.error.__cause__ is s.boom
            assert "boom" in str(srv.error)
            # Every connection was closed by the server.
            assert await b.read_until_closed() == b""
            assert await a.read_until_closed() == b""
    # No handler ran after the panic: no on_abort for B's open message, no on_close.
    assert s.calls[calls_at_panic:] == []
    assert "abort" not in s.calls
    assert "close" not in s.calls


async def test_without_handlers_running_the_panic_stops_serve_at_once() -> None:
    """No grace is needed when nothing runs: serve() raises, the others are closed."""
    s = Scenario()
    async with served(s.milter, panic_grace=3 * TIMEOUT) as srv:
        with trio.fail_after(TIMEOUT):
            idle = await RawMta.to(srv.address)
            await idle.negotiate()
            assert await idle.connect("idle") == Continue()
            a = await RawMta.to(srv.address)
            await a.negotiate()
            assert await a.connect("a-host") == Continue()
            assert await a.helo("panic") == Tempfail()
            await srv.wait()  # bounded by TIMEOUT, far below the 30 s panic grace
            assert isinstance(srv.error, MilterPanic)
            assert srv.error.__cause__ is s.boom
            assert await idle.read_until_closed() == b""
            assert await a.read_until_closed() == b""
    assert "close" not in s.calls


async def test_panic_in_a_background_task_of_the_connection() -> None:
    boom = LookupError("background lookup failed")
    go = trio.Event()
    calls: list[str] = []

    async def lookup() -> None:
        await go.wait()
        raise boom

    @on_connect
    async def connect(ctx: Context[None], hostname: str, address: SocketInfo | None) -> Status:
        ctx.connection_nursery.start_soon(lookup)
        return Status.CONTINUE

    @on_helo
    async def helo(ctx: Context[None], hostname: str) -> Status:
        calls.append(f"helo {hostname}")
        return Status.CONTINUE

    @on_close
    async def close(ctx: Context[None]) -> None:
        calls.append("close")

    milter = Milter("background", handlers=[connect, helo, close])
    async with served(milter, panic_grace=3 * TIMEOUT) as srv:
        with trio.fail_after(TIMEOUT):
            client = await RawMta.to(srv.address)
            await client.negotiate()
            assert await client.connect() == Continue()
            assert await client.helo("first") == Continue()
            go.set()
            await srv.wait()
            assert isinstance(srv.error, MilterPanic)
            assert srv.error.__cause__ is boom
            assert await client.read_until_closed() == b""
    assert calls == ["helo first"]
