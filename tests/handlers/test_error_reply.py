"""``ctx.api.set_error_reply`` (SPEC §2.3, protocol.md §9).

One line or several (``550-5.7.1 a\\r\\n550 5.7.1 b``), a default extended
code for multi-line replies, ``%`` sent as ``%%``; used only when the
handler returns the matching class (5xx with REJECT, 4xx with TEMPFAIL) and
forgotten after the handler's reply.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from triomilter import (
    Context,
    InvalidArgument,
    Milter,
    MilterError,
    Ok,
    Result,
    SocketInfo,
    Status,
    on_connect,
    on_eom,
    on_helo,
    on_mail,
    on_rcpt,
    on_unknown,
)
from triomilter.protocol import ReplyWithCode
from triomilter.testing import StepReply

from ._support import OpenMilter, open_sniffed, packet

Reply = tuple[str | int, str | None, str | Sequence[str]]


def replying(reply: Reply, status: Status) -> Milter:
    """Sets ``reply`` and returns ``status`` at HELO, RCPT, EOM and UNKNOWN."""

    def answer(ctx: Context[None]) -> Status:
        ctx.api.set_error_reply(*reply)
        return status

    @on_helo
    async def helo(ctx: Context[None], hostname: str) -> Status:
        return answer(ctx)

    @on_rcpt
    async def rcpt(ctx: Context[None], args: list[str]) -> Status:
        return answer(ctx)

    @on_eom
    def eom(ctx: Context[None]) -> Status:
        return answer(ctx)

    @on_unknown
    async def unknown(ctx: Context[None], command: str) -> Status:
        return answer(ctx)

    return Milter("reply", handlers=[helo, rcpt, eom, unknown])


CASES: list[tuple[Reply, Status, str]] = [
    (("550", "5.7.1", "Go away"), Status.REJECT, "550 5.7.1 Go away"),
    ((550, "5.7.1", ["Go away"]), Status.REJECT, "550 5.7.1 Go away"),
    (("554", None, "No"), Status.REJECT, "554 No"),
    (("421", "4.7.0", "Closing"), Status.TEMPFAIL, "421 4.7.0 Closing"),
    (("451", None, ""), Status.TEMPFAIL, "451 "),  # libmilter: "ddd SP"; Postfix refuses "ddd"
    (("550", "5.7.1", ["a", "b"]), Status.REJECT, "550-5.7.1 a\r\n550 5.7.1 b"),
    (("550", None, ["a", "b"]), Status.REJECT, "550-5.0.0 a\r\n550 5.0.0 b"),
    (("452", None, ["x", "y", "z"]), Status.TEMPFAIL, "452-4.0.0 x\r\n452-4.0.0 y\r\n452 4.0.0 z"),
    (("550", "5.7.1", "100% sure"), Status.REJECT, "550 5.7.1 100%% sure"),
    (("550", "5.7.1", ["50%", "%%"]), Status.REJECT, "550-5.7.1 50%%\r\n550 5.7.1 %%%%"),
    (("550", "5.7.1", ["x"] * 32), Status.REJECT, "550-5.7.1 x\r\n" * 31 + "550 5.7.1 x"),
    (("550", "5.1.1", "é" * 980), Status.REJECT, "550 5.1.1 " + "é" * 980),
]


@pytest.mark.parametrize(("reply", "status", "text"), CASES)
async def test_custom_replies(
    open_milter: OpenMilter, reply: Reply, status: Status, text: str
) -> None:
    async with open_milter(replying(reply, status)) as client:
        await client.connect("mx", None)
        assert await client.unknown("VRFY x") == StepReply(status, text)
        await client.mail("<a@b>")
        assert await client.rcpt("<c@d>") == StepReply(status, text)  # this recipient only
        assert await client.rcpt("<e@f>") == StepReply(status, text)
        result = await client.eom()
        assert (result.status, result.text) == (status, text)
        assert result.raw == ReplyWithCode(text.encode())
        assert await client.helo("mx") == StepReply(status, text)


async def test_multi_line_reply_bytes_on_the_wire() -> None:
    async with open_sniffed(replying(("550", "5.7.1", ["a", "b"]), Status.REJECT)) as (
        client,
        writes,
    ):
        reply = await client.helo("mx")
    assert (reply.smtp_code, reply.extended_code, reply.lines) == (550, "5.7.1", ["a", "b"])
    assert packet(b"y", b"550-5.7.1 a\r\n550 5.7.1 b\0") in writes


@pytest.mark.parametrize(
    ("reply", "status", "expected"),
    [
        (("550", "5.7.1", "x"), Status.TEMPFAIL, Status.TEMPFAIL),
        (("451", "4.7.1", "x"), Status.REJECT, Status.REJECT),
        (("550", "5.7.1", "x"), Status.CONTINUE, Status.CONTINUE),
        (("451", "4.7.1", "x"), Status.ACCEPT, Status.ACCEPT),
        (("550", "5.7.1", "x"), Status.DISCARD, Status.DISCARD),
    ],
)
async def test_used_only_when_the_class_matches(
    open_milter: OpenMilter, reply: Reply, status: Status, expected: Status
) -> None:
    async with open_milter(replying(reply, status)) as client:
        await client.mail("<a@b>")
        assert await client.rcpt("<c@d>") == StepReply(expected)  # plain r/t/c/a/d, no text
        result = await client.eom()
    assert (result.status, result.text) == (expected, None)


def forgetting() -> Milter:
    @on_connect
    async def connect(ctx: Context[None], hostname: str, address: SocketInfo | None) -> Status:
        ctx.api.set_error_reply("550", "5.7.1", "set at connect")
        return Status.CONTINUE

    @on_helo
    async def helo(ctx: Context[None], hostname: str) -> Status:
        if hostname == "set":
            ctx.api.set_error_reply("451", "4.7.1", "set at helo")
            return Status.CONTINUE
        return Status.TEMPFAIL

    @on_mail
    async def mail(ctx: Context[None], args: list[str]) -> Status:
        return Status.REJECT if args[0] == "<reject@b>" else Status.CONTINUE

    @on_rcpt
    async def rcpt(ctx: Context[None], args: list[str]) -> Status:
        ctx.api.set_error_reply("550", "5.1.1", "first")
        ctx.api.set_error_reply("550", "5.1.2", "second")  # the last call wins
        return Status.REJECT

    return Milter("forget", handlers=[connect, helo, mail, rcpt])


async def test_forgotten_after_the_handlers_reply(open_milter: OpenMilter) -> None:
    async with open_milter(forgetting()) as client:
        assert await client.connect("mx", None) == StepReply(Status.CONTINUE)
        assert await client.helo("set") == StepReply(Status.CONTINUE)
        # Neither the connect nor the helo reply carries over.
        assert await client.mail("<reject@b>") == StepReply(Status.REJECT)
        assert await client.mail("<a@b>") == StepReply(Status.CONTINUE)
        assert await client.rcpt("<c@d>") == StepReply(Status.REJECT, "550 5.1.2 second")
        assert await client.helo("other") == StepReply(Status.TEMPFAIL)


INVALID: list[Reply] = [
    ("250", "2.0.0", "ok"),  # not 4xx/5xx
    ("650", None, "x"),
    ("55", None, "x"),
    ("5500", None, "x"),
    ("abc", None, "x"),
    (200, None, "x"),
    ("550", "4.7.1", "class mismatch"),
    ("451", "5.7.1", "class mismatch"),
    ("550", "2.0.0", "class mismatch"),
    ("550", "5.7", "malformed ext"),
    ("550", "5.7.1.1", "malformed ext"),
    ("550", "5.1000.1", "malformed ext"),
    ("550", "x.y.z", "malformed ext"),
    ("550", "5.7.1", ["x"] * 33),  # > 32 lines
    ("550", "5.7.1", "x" * 981),  # > 980 chars
    ("550", "5.7.1", ["ok", "y" * 981]),
    ("550", "5.7.1", "a\r\nb"),
    ("550", "5.7.1", "a\nb"),
    ("550", "5.7.1", ["a", "b\r"]),
    ("550", "5.7.1", "a\0b"),
    ("550", "5.7.1", []),
    ("550", "5.7.1", [b"bytes"]),  # type: ignore[list-item]
]


@pytest.mark.parametrize("reply", INVALID, ids=[repr(r)[:40] for r in INVALID])
async def test_invalid_replies_raise(open_milter: OpenMilter, reply: Reply) -> None:
    raised: list[BaseException] = []

    @on_helo
    async def helo(ctx: Context[None], hostname: str) -> Status:
        try:
            ctx.api.set_error_reply(*reply)
        except MilterError as exc:
            raised.append(exc)
        return Status.REJECT  # and nothing was set: a plain reject

    @on_mail
    async def mail(ctx: Context[None], args: list[str]) -> Result[Status]:
        ctx.api.set_error_reply(*reply)  # uncaught in a Result handler: TEMPFAIL
        return Ok(Status.REJECT)  # pragma: no cover

    async with open_milter(Milter("bad", handlers=[helo, mail])) as client:
        assert await client.mail("<a@b>") == StepReply(Status.TEMPFAIL)
        assert await client.helo("mx") == StepReply(Status.REJECT)
    (exc,) = raised
    assert type(exc) is InvalidArgument
