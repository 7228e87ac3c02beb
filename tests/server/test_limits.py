"""max_connections holds excess connections back; io_timeout closes idle connections."""

from __future__ import annotations

import logging
import os
import socket as stdsocket

import pytest
import trio
import trio.testing

from triomilter import Context, Milter, SocketInfo, Status, on_close, on_connect
from triomilter.protocol import Continue, OptionNegotiationReply

from ._mta import POSTFIX_OFFER, RawMta
from ._support import TIMEOUT, connection_records, served
from .sample_milters import milter


def nothing_received(client: RawMta) -> bool:
    """Whether no byte at all has arrived on ``client``'s socket (without waiting)."""
    trio_sock = client.stream.socket
    with stdsocket.socket(
        trio_sock.family, trio_sock.type, fileno=os.dup(trio_sock.fileno())
    ) as sock:
        try:
            sock.recv(1, stdsocket.MSG_PEEK | stdsocket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
    return False


async def test_max_connections_holds_the_excess_back() -> None:
    async with served(milter, max_connections=2) as srv:
        with trio.fail_after(TIMEOUT):
            first = await RawMta.to(srv.address)
            await first.negotiate()
            second = await RawMta.to(srv.address)
            await second.negotiate()
            # The third connects (the kernel's backlog takes it) but is not served.
            third = await RawMta.to(srv.address)
            await third.send_raw(third.mta.send(POSTFIX_OFFER))
            # The first two keep working meanwhile.
            assert await first.connect() == Continue()
            assert await second.connect() == Continue()
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            assert nothing_received(third)
            # One of the first two leaves: the third is accepted and served.
            await first.quit()
            assert await first.read_until_closed() == b""
            replies = await third.replies()
            assert isinstance(replies[0], OptionNegotiationReply)
            assert await third.connect() == Continue()
            assert await third.helo() == Continue()
            # Still at most two: a fourth waits until another one leaves.
            fourth = await RawMta.to(srv.address)
            await fourth.send_raw(fourth.mta.send(POSTFIX_OFFER))
            assert await second.helo() == Continue()
            await trio.testing.wait_all_tasks_blocked(cushion=0.05)
            assert nothing_received(fourth)
            await second.aclose()
            assert isinstance((await fourth.replies())[0], OptionNegotiationReply)


async def test_io_timeout_closes_an_idle_connection(logs: pytest.LogCaptureFixture) -> None:
    closed: list[str] = []

    @on_connect
    async def connect(ctx: Context[str], hostname: str, address: SocketInfo | None) -> Status:
        ctx.data = hostname
        return Status.CONTINUE

    @on_close
    async def close(ctx: Context[str]) -> None:
        closed.append(ctx.data or "?")

    tracking = Milter("tracking", handlers=[connect, close])
    async with served(tracking, io_timeout=0.5) as srv:
        with trio.fail_after(TIMEOUT):
            silent = await RawMta.to(srv.address)  # never says a word
            idle = await RawMta.to(srv.address)
            await idle.negotiate()
            assert await idle.connect("idle-host") == Continue()
            # Say nothing more: the milter closes the connection (EOF), on_close runs.
            assert await idle.read_until_closed() == b""
            assert closed == ["idle-host"]
            assert await silent.read_until_closed() == b""
            # The server keeps serving.
            fresh = await RawMta.to(srv.address)
            await fresh.negotiate()
            assert await fresh.connect("fresh-host") == Continue()
            await fresh.quit()
            assert await fresh.read_until_closed() == b""
            assert closed == ["idle-host", "fresh-host"]
            assert not srv.done.is_set()
    for connection_id in ("#1", "#2"):
        [line] = connection_records(logs, connection_id, logging.WARNING)
        assert "0.5 s" in line.getMessage()
        assert "closing the connection" in line.getMessage()
