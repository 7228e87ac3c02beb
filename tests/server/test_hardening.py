"""Nothing a peer, a slow MTA or a handler does can lock the milter out or take it down.

Each test is one finding of the hardening review, over real sockets:
a hung handler, a handler past its deadline, a trickling peer, a blocking
handler, an unexpected exception with ``on_exception="tempfail"``. (The
connection limit: test_limits.py; hostile negotiation words: test_memory.py;
forced stop: test_shutdown.py; the example and a CR in a host name:
tests/examples.)
"""

from __future__ import annotations

import logging
import time

import pytest
import trio
import trio.testing

from triomilter import (
    Actions,
    Context,
    Metrics,
    Milter,
    Status,
    blocking,
    on_abort,
    on_close,
    on_eom,
    on_helo,
    on_mail,
    on_rcpt,
)
from triomilter.protocol import AddHeader, Continue, Helo, Progress, Rcpt, Reject, Tempfail

from ._mta import RawMta, frame
from ._support import TIMEOUT, connection_records, served


def messages(caplog: pytest.LogCaptureFixture, level: int = logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "triomilter" and r.levelno >= level]


async def test_a_hung_handler_frees_its_slot_when_the_mta_hangs_up(
    logs: pytest.LogCaptureFixture,
) -> None:
    """Finding 1: a handler that never returns, the MTA gives up and closes.

    With one slot, the next MTA is served at once: the hang-up is noticed
    while the handler runs (its deadline here is ten minutes away).
    """
    events: list[str] = []
    hung = trio.Event()
    closed = trio.Event()

    @on_rcpt
    async def rcpt(ctx: Context[None], args: list[str]) -> Status:
        if args[0] == "<hang@example.net>":
            hung.set()
            try:
                await trio.sleep_forever()  # a lookup without a timeout
            except trio.Cancelled:
                events.append("cancelled")
                raise
        return Status.CONTINUE

    @on_abort
    async def abort(ctx: Context[None]) -> None:
        events.append("abort")  # the message was cut short: its resources go

    @on_close
    async def close(ctx: Context[None]) -> None:
        events.append("close")
        closed.set()

    milter = Milter("hang", handlers=[rcpt, abort, close])
    async with served(milter, max_connections=1, handler_timeout=600.0) as srv:
        with trio.fail_after(TIMEOUT):
            first = await RawMta.to(srv.address)
            await first.negotiate()
            await first.connect()
            await first.mail()
            await first.send_raw(first.mta.send(Rcpt((b"<hang@example.net>",))))
            await hung.wait()
            await first.aclose()  # the MTA's own timeout ran out
            await closed.wait()  # noticed: cancelled and closed, long before its deadline
            await trio.testing.wait_all_tasks_blocked()  # the connection's last cleanup
            second = await RawMta.to(srv.address)
            await second.negotiate()
            await second.connect()
            await second.mail()
            assert await second.rcpt() == Continue()  # served, not refused: the slot is free
    assert events[:3] == ["cancelled", "abort", "close"]  # then the second connection's
    assert any("the MTA closed the connection while handler" in m for m in messages(logs))


async def test_a_handler_past_its_deadline_is_answered_tempfail(
    logs: pytest.LogCaptureFixture,
) -> None:
    """Every handler call is bounded: TEMPFAIL, a warning, and the connection goes on."""

    @on_mail
    async def mail(ctx: Context[None], args: list[str]) -> Status:
        if args[0] == "<slow@example.org>":
            await trio.sleep_forever()
        return Status.CONTINUE

    async with served(Milter("deadline", handlers=[mail]), handler_timeout=0.2) as srv:
        with trio.fail_after(TIMEOUT):
            client = await RawMta.to(srv.address)
            await client.negotiate()
            await client.connect()
            assert await client.mail("<slow@example.org>") == Tempfail()
            assert await client.mail("<fast@example.org>") == Continue()  # the connection goes on
    warnings = [m for m in messages(logs) if "did not return within 0.2 s" in m]
    assert len(warnings) == 1, messages(logs)
    assert "mail: handler" in warnings[0] and "answering TEMPFAIL" in warnings[0]


async def test_a_slow_end_of_message_sends_progress_and_keeps_its_changes() -> None:
    @on_eom
    async def eom(ctx: Context[None]) -> Status:
        await trio.sleep(0.35)  # an antivirus scan, say
        await ctx.api.add_header("X-Scanned", "yes")
        return Status.CONTINUE

    milter = Milter("scan", handlers=[eom], actions=Actions.ADD_HEADER)
    async with served(milter, progress_interval=0.1) as srv:
        with trio.fail_after(TIMEOUT):
            client = await RawMta.to(srv.address)
            await client.negotiate()
            await client.connect()
            replies = await client.message()
    progress = [reply for reply in replies if isinstance(reply, Progress)]
    assert progress  # sent while the handler worked
    assert replies[len(progress) :] == [AddHeader(b"X-Scanned", b"yes"), Continue()]


async def test_a_trickling_peer_is_closed(logs: pytest.LogCaptureFixture) -> None:
    """Finding 2: a packet must be complete within the I/O timeout of its first byte."""

    @on_helo
    async def helo(ctx: Context[None], hostname: str) -> Status:
        return Status.CONTINUE

    async with served(Milter("trickle", handlers=[helo]), io_timeout=0.5) as srv:
        with trio.fail_after(TIMEOUT):
            client = await RawMta.to(srv.address)
            await client.negotiate()
            await client.connect()
            packet = frame("H", b"x" * 200 + b"\0")
            closed = False
            for byte in packet:  # one byte every 0.05 s: the I/O never stalls 0.5 s
                try:
                    await client.send_raw(bytes((byte,)))
                except trio.BrokenResourceError:
                    closed = True
                    break
                await trio.sleep(0.05)
            if not closed:
                assert await client.read_until_closed() == b""
    assert any("was not complete 0.5 s after its first byte" in m for m in messages(logs))


async def test_a_blocking_handler_is_reported(logs: pytest.LogCaptureFixture) -> None:
    """Finding 5: a plain def that blocks holds every connection up; it is logged."""

    @on_helo
    def helo(ctx: Context[None], hostname: str) -> Status:
        time.sleep(0.3)  # a synchronous DNS lookup, say
        return Status.CONTINUE

    metrics = Metrics()
    milter = Milter("blocking", handlers=[helo])
    async with served(milter, stall_warning=0.1, metrics=metrics) as srv:
        with trio.fail_after(TIMEOUT):
            client = await RawMta.to(srv.address)
            await client.negotiate()
            await client.connect()
            assert await client.helo() == Continue()
    assert metrics.loop_stalls == 1
    stalls = [m for m in messages(logs) if "held the event loop" in m]
    assert len(stalls) == 1, messages(logs)
    assert "helo: handler" in stalls[0] and "mark a plain def @blocking" in stalls[0]


async def test_blocking_handlers_run_in_threads_and_others_go_on(
    logs: pytest.LogCaptureFixture,
) -> None:
    """``@blocking``: the plain def runs in a worker thread, bounded by thread_limit."""
    started = trio.Event()
    release = trio.Event()
    token: list[trio.lowlevel.TrioToken] = []

    @on_helo
    @blocking
    def helo(ctx: Context[None], hostname: str) -> Status:
        if hostname == "slow.example":
            trio.from_thread.run_sync(started.set, trio_token=token[0])
            trio.from_thread.run(release.wait, trio_token=token[0])
        return Status.REJECT if hostname == "bad.example" else Status.CONTINUE

    token.append(trio.lowlevel.current_trio_token())
    async with served(Milter("threads", handlers=[helo]), thread_limit=2) as srv:
        with trio.fail_after(TIMEOUT):
            slow = await RawMta.to(srv.address)
            await slow.negotiate()
            await slow.connect()
            await slow.send_raw(slow.mta.send(Helo(b"slow.example")))
            await started.wait()
            # Another connection is served while the thread blocks.
            other = await RawMta.to(srv.address)
            await other.negotiate()
            await other.connect()
            assert await other.helo("bad.example") == Reject()
            release.set()
            assert await slow.replies() == [Continue()]
    assert not [m for m in messages(logs) if "held the event loop" in m]


async def test_on_exception_tempfail_keeps_the_server_up(logs: pytest.LogCaptureFixture) -> None:
    """Code ported from pymilter: an unexpected exception is TEMPFAIL, not a shutdown."""

    @on_mail
    async def mail(ctx: Context[None], args: list[str]) -> Status:
        if args[0] == "<bug@example.org>":
            raise KeyError("a bug in the handler")
        return Status.CONTINUE

    milter = Milter("ported", handlers=[mail], on_exception="tempfail")
    async with served(milter) as srv:
        with trio.fail_after(TIMEOUT):
            client = await RawMta.to(srv.address)
            await client.negotiate()
            await client.connect()
            assert await client.mail("<bug@example.org>") == Tempfail()
            assert await client.mail("<fine@example.org>") == Continue()
            other = await RawMta.to(srv.address)  # a new connection too
            await other.negotiate()
            await other.connect()
            assert await other.mail("<fine@example.org>") == Continue()
    assert srv.error is None
    errors = [
        r
        for r in logs.records
        if r.levelno == logging.ERROR and "raised KeyError" in r.getMessage()
    ]
    assert len(errors) == 1 and errors[0].exc_info is not None  # with its traceback
    assert not connection_records(logs, "#1", logging.CRITICAL)
