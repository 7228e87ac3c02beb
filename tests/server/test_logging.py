"""Logging: every line about a connection names it; the queue id once it is known."""

from __future__ import annotations

import logging

import pytest
import trio

from triomilter import (
    Context,
    Err,
    Milter,
    MilterError,
    Result,
    SocketInfo,
    Status,
    on_connect,
    on_eom,
    on_helo,
    on_mail,
    on_rcpt,
)
from triomilter.protocol import Continue, Tempfail

from ._mta import RawMta, frame
from ._support import TIMEOUT, served


@on_connect
async def connect(ctx: Context[None], hostname: str, address: SocketInfo | None) -> Status:
    return Status.CONTINUE


@on_helo
async def helo(ctx: Context[None], hostname: str) -> Result[Status]:
    return Err(MilterError("helo lookup failed"))  # logged before the queue id is known


@on_mail
async def mail(ctx: Context[None], args: list[str]) -> Status:
    return Status.CONTINUE


@on_rcpt
async def rcpt(ctx: Context[None], args: list[str]) -> Result[Status]:
    return Err(MilterError("rcpt lookup failed"))  # logged with the queue id


@on_eom
async def eom(ctx: Context[None]) -> Status:
    return Status.SKIP  # not valid at end of message: an error line with the queue id


chatty = Milter("chatty", handlers=[connect, helo, mail, rcpt, eom])


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "triomilter"]


async def test_connection_id_on_every_line_and_queue_id_when_known(
    logs: pytest.LogCaptureFixture,
) -> None:
    async with served(chatty) as srv:
        logs.clear()  # the server's own start-up line is about no connection
        with trio.fail_after(TIMEOUT):
            client = await RawMta.to(srv.address)
            await client.negotiate()
            assert await client.connect() == Continue()
            assert await client.helo() == Tempfail()
            await client.macros("M", i="4QID7")
            assert await client.mail() == Continue()
            assert await client.rcpt() == Tempfail()
            assert (await client.eom())[-1] == Tempfail()
            # A second connection breaks the protocol mid-message.
            other = await RawMta.to(srv.address)
            await other.negotiate()
            assert await other.connect() == Continue()
            await other.macros("M", i="4QID8")
            assert await other.mail() == Continue()
            await other.send_raw(frame("X"))
            assert await other.read_until_closed() == b""
            await client.quit()
            assert await client.read_until_closed() == b""
    messages = lines(logs)
    about_1 = [m for m in messages if m.startswith("[#1] ")]
    about_2 = [m for m in messages if m.startswith("[#2] ")]
    # Nothing but the connections was logged about, and every line names one.
    assert len(about_1) + len(about_2) == len(messages), messages
    # Connection lines exist from accept on (DEBUG), before any queue id.
    assert any("connection from" in m for m in about_1)
    assert any("connection from" in m for m in about_2)
    [helo_line] = [m for m in about_1 if "helo lookup failed" in m]
    assert "4QID7" not in helo_line
    [rcpt_line] = [m for m in about_1 if "rcpt lookup failed" in m]
    assert rcpt_line.startswith("[#1] 4QID7: ")
    [eom_line] = [m for m in about_1 if "SKIP" in m]
    assert eom_line.startswith("[#1] 4QID7: ")
    [error_line] = [m for m in about_2 if "protocol error" in m]
    assert error_line.startswith("[#2] 4QID8: ")
    levels = {r.getMessage(): r.levelno for r in logs.records}
    assert levels[error_line] >= logging.WARNING
    assert levels[eom_line] >= logging.ERROR


async def test_panic_line_names_the_connection(logs: pytest.LogCaptureFixture) -> None:
    @on_helo
    async def boom(ctx: Context[None], hostname: str) -> Status:
        raise ZeroDivisionError("boom")

    async with served(Milter("boom", handlers=[connect, boom])) as srv:
        with trio.fail_after(TIMEOUT):
            first = await RawMta.to(srv.address)
            await first.negotiate()
            second = await RawMta.to(srv.address)
            await second.negotiate()
            assert await second.connect() == Continue()
            assert await second.helo() == Tempfail()
            await srv.wait()
    [line] = [r for r in logs.records if "panicked" in r.getMessage() and "[#" in r.getMessage()]
    assert line.getMessage().startswith("[#2] ")
    assert "ZeroDivisionError('boom')" in line.getMessage()
    assert line.levelno == logging.CRITICAL
    assert line.exc_info is not None and isinstance(line.exc_info[1], ZeroDivisionError)
