"""Bad input closes only its connection, with one log line naming it and the reason.

After each, a normal transaction on a new connection still succeeds. A macro
value in UTF-8 is not bad input: it must work.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Awaitable, Callable

import pytest
import trio

from triomilter import (
    Context,
    Milter,
    SocketInfo,
    Status,
    on_abort,
    on_close,
    on_connect,
    on_eom,
    on_helo,
    on_mail,
    on_rcpt,
)
from triomilter.protocol import Continue

from ._mta import RawMta, frame
from ._support import TIMEOUT, connection_records, served

Calls = list[str]


def recording_milter(calls: Calls) -> Milter:
    @on_connect
    async def connect(ctx: Context[None], hostname: str, address: SocketInfo | None) -> Status:
        calls.append("connect")
        return Status.CONTINUE

    @on_helo
    async def helo(ctx: Context[None], hostname: str) -> Status:
        calls.append("helo")
        return Status.CONTINUE

    @on_mail
    async def mail(ctx: Context[None], args: list[str]) -> Status:
        calls.append(
            f"mail {ctx.api.macro_value('{mail_addr}')} {ctx.api.macro_value('mail_addr')}"
        )
        return Status.CONTINUE

    @on_rcpt
    async def rcpt(ctx: Context[None], args: list[str]) -> Status:
        calls.append("rcpt")
        return Status.CONTINUE

    @on_eom
    async def eom(ctx: Context[None]) -> Status:
        calls.append("eom")
        return Status.CONTINUE

    @on_abort
    async def abort(ctx: Context[None]) -> None:
        calls.append("abort")

    @on_close
    async def close(ctx: Context[None]) -> None:
        calls.append("close")

    return Milter("recording", handlers=[connect, helo, mail, rcpt, eom, abort, close])


async def negotiated(client: RawMta) -> None:
    await client.negotiate()


async def connected(client: RawMta) -> None:
    await client.negotiate()
    assert await client.connect() == Continue()


async def in_message(client: RawMta) -> None:
    await connected(client)
    assert await client.mail() == Continue()
    assert await client.rcpt() == Continue()


async def nothing(client: RawMta) -> None:
    pass


# (name, how far the connection goes first, the bad bytes, the reason in the log line)
CASES: list[tuple[str, Callable[[RawMta], Awaitable[None]], bytes, str]] = [
    ("oversized length", connected, struct.pack(">I", 65537) + b"B", "exceeds the limit"),
    (
        "oversized length before negotiation",
        nothing,
        struct.pack(">I", 1 << 31) + b"O",
        "exceeds the limit",
    ),
    ("zero length", connected, b"\0\0\0\0", "length 0"),
    ("unknown command", connected, frame("X", b"what"), "not a milter command"),
    (
        "truncated packet then close",
        connected,
        struct.pack(">I", 20) + b"Hshort",
        "middle of a packet",
    ),
    ("garbage before negotiation", nothing, b"EHLO mx.example\r\n", "exceeds the limit"),
    ("command before negotiation", nothing, frame("C", b"h\0U"), "unexpected CONNECT"),
    ("malformed connect", negotiated, frame("C", b"host\x004\x00"), "CONNECT ('C')"),
    ("connect without NUL", negotiated, frame("C", b"host"), "CONNECT ('C')"),
    ("end of message before connect", negotiated, frame("E"), "unexpected"),
    ("body before MAIL", connected, frame("B", b"x"), "unexpected"),
    ("header without value", in_message, frame("L", b"Subject\0"), "HEADER ('L')"),
]


@pytest.mark.parametrize(("name", "before", "bad", "reason"), CASES, ids=[c[0] for c in CASES])
async def test_bad_input_closes_only_its_connection(
    logs: pytest.LogCaptureFixture,
    name: str,
    before: Callable[[RawMta], Awaitable[None]],
    bad: bytes,
    reason: str,
) -> None:
    calls: Calls = []
    async with served(recording_milter(calls)) as srv:
        with trio.fail_after(TIMEOUT):
            # A bystander connection, open before the bad one.
            bystander = await RawMta.to(srv.address)
            await bystander.negotiate()
            assert await bystander.connect() == Continue()

            bad_client = await RawMta.to(srv.address)
            await before(bad_client)
            await bad_client.send_raw(bad)
            if "then close" in name:
                await bad_client.stream.send_eof()
            # Closed without a word: the milter answers nothing it was not asked.
            assert await bad_client.read_until_closed() == b""

            # One log line about it, naming the connection and the reason.
            [line] = connection_records(logs, "#2", logging.WARNING)
            assert reason in line.getMessage(), line.getMessage()

            # The bystander and new connections are served as ever.
            assert await bystander.helo() == Continue()
            fresh = await RawMta.to(srv.address)
            assert (await fresh.transaction())[-1] == Continue()
            assert await bystander.mail() == Continue()
            assert not srv.done.is_set()
    assert connection_records(logs, "#1", logging.WARNING) == []
    assert connection_records(logs, "#3", logging.WARNING) == []


async def test_eof_mid_message_runs_abort_then_close(logs: pytest.LogCaptureFixture) -> None:
    calls: Calls = []
    async with served(recording_milter(calls)) as srv:
        with trio.fail_after(TIMEOUT):
            client = await RawMta.to(srv.address)
            await in_message(client)
            await client.stream.send_eof()
            assert await client.read_until_closed() == b""
            assert calls[-2:] == ["abort", "close"]
            [line] = connection_records(logs, "#1", logging.WARNING)
            assert "mid-message" in line.getMessage()
            fresh = await RawMta.to(srv.address)
            assert (await fresh.transaction())[-1] == Continue()


async def test_utf8_macro_value_works(logs: pytest.LogCaptureFixture) -> None:
    calls: Calls = []
    async with served(recording_milter(calls)) as srv:
        with trio.fail_after(TIMEOUT):
            client = await RawMta.to(srv.address)
            await connected(client)
            await client.macros("M", **{"{mail_addr}": "jörg@exämple.org", "i": "QID"})
            assert await client.mail("<jörg@exämple.org>") == Continue()
            assert calls[-1] == "mail jörg@exämple.org jörg@exämple.org"
            # The connection goes on normally.
            assert await client.rcpt() == Continue()
            await client.data()
            assert (await client.eom())[-1] == Continue()
            await client.quit()
            assert await client.read_until_closed() == b""
    assert connection_records(logs, "#1", logging.WARNING) == []
