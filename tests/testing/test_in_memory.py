"""The client in memory against real decorated handlers (no socket)."""

from __future__ import annotations

import re

import attrs
import pytest

import triomilter
from triomilter import (
    Actions,
    Context,
    MacroStage,
    Milter,
    MilterPanic,
    ProtocolOpts,
    Result,
    SocketFamily,
    SocketInfo,
    Status,
)
from triomilter.protocol import ALL_ACTIONS, ALL_PROTOCOL_OPTS
from triomilter.testing import (
    AddHeader,
    InsertHeader,
    MilterClient,
    Quarantine,
    RemoveRecipient,
    ReplaceBody,
    ReplaceHeader,
    StepReply,
    open_in_memory,
)
from triomilter.testing.pytest_plugin import OpenClient


@attrs.define
class Seen:
    events: list[object] = attrs.field(factory=list)


SEEN = Seen()


@triomilter.on_connect
async def connect(ctx: Context[list[str]], hostname: str, address: SocketInfo | None) -> Status:
    SEEN.events.append(("connect", hostname, address, ctx.api.macro_value("j")))
    ctx.data = []
    return Status.CONTINUE


@triomilter.on_helo
async def helo(ctx: Context[list[str]], hostname: str) -> Status:
    if hostname == "spammer":
        ctx.api.set_error_reply(550, "5.7.1", ["Go away", "and stay away"])
        return Status.REJECT
    if hostname == "crash":
        raise ZeroDivisionError("helo crashed")
    return Status.CONTINUE


@triomilter.on_mail
async def mail(ctx: Context[list[str]], args: list[str]) -> Status:
    SEEN.events.append(("mail", args, ctx.api.macro_value("{auth_authen}")))
    return Status.CONTINUE


@triomilter.on_rcpt
async def rcpt(ctx: Context[list[str]], args: list[str]) -> Result[Status]:
    if args[0] == "<fail@example.net>":
        raise triomilter.MilterError("lookup failed")  # -> Err -> TEMPFAIL
    if args[0] == "<nobody@example.net>":
        ctx.api.set_error_reply("550", "5.1.1", "No such user")
        return triomilter.Ok(Status.REJECT)
    assert ctx.data is not None
    ctx.data.append(args[0])
    return triomilter.Ok(Status.CONTINUE)


@triomilter.on_header
async def header(ctx: Context[list[str]], name: str, value: bytes) -> Status:
    SEEN.events.append(("header", name, value))
    return Status.CONTINUE


@triomilter.on_body
async def body(ctx: Context[list[str]], chunk: bytes) -> Status:
    SEEN.events.append(("body", len(chunk)))
    return Status.SKIP if b"SKIP" in chunk else Status.CONTINUE


@triomilter.on_eom
async def eom(ctx: Context[list[str]]) -> Status:
    api = ctx.api
    await api.signal_progress()
    await api.add_header("X-Rcpts", ",".join(ctx.data or []))
    await api.insert_header(0, "X-First", "1")
    await api.replace_header("Subject", 1, "[tagged]")
    await api.replace_header("X-Old", 1, None)
    await api.add_recipient("<copy@example.net>")
    await api.add_recipient("<dsn@example.net>", "NOTIFY=NEVER")
    await api.remove_recipient("<b@example.net>")
    await api.replace_sender("<bounce@example.org>")
    await api.append_body_chunk(b"new body\r\n")
    await api.quarantine("held for review")
    return Status.CONTINUE


EVERYTHING = Milter(
    "everything",
    handlers=[connect, helo, mail, rcpt, header, body, eom],
    actions=ALL_ACTIONS & ~Actions.REQUEST_MACROS,
    protocol_opts=ProtocolOpts.SKIP,
    macros={MacroStage.MAIL: "{auth_authen}"},
)


@pytest.fixture(autouse=True)
def _fresh_seen() -> None:
    SEEN.events.clear()


async def test_negotiation_follows_the_handlers() -> None:
    async with open_in_memory(EVERYTHING) as client:
        assert client.negotiated_actions & Actions.ADD_HEADER
        opts = client.negotiated_opts
        assert opts & ProtocolOpts.SKIP
        assert opts & ProtocolOpts.NO_DATA and opts & ProtocolOpts.NO_EOH
        assert not opts & (ProtocolOpts.NO_HEADER | ProtocolOpts.NO_BODY)
        assert client.requested_macros == {MacroStage.MAIL: ["{auth_authen}"]}


async def test_a_whole_session() -> None:
    async with open_in_memory(EVERYTHING) as client:
        reply = await client.connect(
            "mx.example", ("2001:db8::1", 2525), macros={"j": "mta.example"}
        )
        assert reply == StepReply(Status.CONTINUE)
        assert (await client.helo("mx.example")).status is Status.CONTINUE
        mail_macros = {"{auth_authen}": "alice"}
        await client.mail("<a@example.org>", "SIZE=10", macros=mail_macros)
        assert (await client.rcpt("<b@example.net>")).status is Status.CONTINUE
        assert (await client.rcpt("<fail@example.net>")).status is Status.TEMPFAIL
        refused = await client.rcpt("<nobody@example.net>")
        assert (refused.status, refused.text) == (Status.REJECT, "550 5.1.1 No such user")
        assert await client.data() == StepReply(Status.CONTINUE, sent=False)  # no on_data
        assert (await client.header("Subject", "caf\xe9")).status is Status.CONTINUE
        await client.eoh()
        assert (await client.body(b"x" * 70_000)).status is Status.CONTINUE
        assert (await client.body(b"SKIP")).status is Status.SKIP
        assert (await client.body(b"more")) == StepReply(Status.SKIP, sent=False)
        result = await client.eom()

    assert (result.status, result.progress) == (Status.CONTINUE, 1)
    assert result.modifications[:4] == [
        AddHeader("X-Rcpts", "<b@example.net>"),
        InsertHeader(0, "X-First", "1"),
        ReplaceHeader("Subject", 1, "[tagged]"),
        ReplaceHeader("X-Old", 1, None),
    ]
    assert result.has_added_recipient("<copy@example.net>", None)
    assert result.has_added_recipient("<dsn@example.net>", "NOTIFY=NEVER")
    assert RemoveRecipient("<b@example.net>") in result.modifications
    assert result.has_replaced_sender("<bounce@example.org>", None)
    assert result.modifications[-2:] == [
        ReplaceBody(b"new body\r\n", (b"new body\r\n",)),
        Quarantine("held for review"),
    ]
    assert SEEN.events == [
        (
            "connect",
            "mx.example",
            SocketInfo(SocketFamily.INET6, "2001:db8::1", 2525),
            "mta.example",
        ),
        ("mail", ["<a@example.org>", "SIZE=10"], "alice"),
        ("header", "Subject", "caf\xe9".encode()),
        ("body", 65535),
        ("body", 70_000 - 65535),
        ("body", 4),
    ]


async def test_multi_line_error_reply_from_a_handler() -> None:
    async with open_in_memory(EVERYTHING) as client:
        await client.connect("spammer", None)
        reply = await client.helo("spammer")
        assert reply.status is Status.REJECT
        assert reply.smtp_code == 550
        assert reply.extended_code == "5.7.1"
        assert reply.lines == ["Go away", "and stay away"]
        assert await client.mail("<a@b>") == StepReply(Status.REJECT, sent=False)


async def test_a_panic_surfaces_when_the_session_ends() -> None:
    with pytest.raises(MilterPanic) as info:
        async with open_in_memory(EVERYTHING) as client:
            await client.connect("mx", None)
            reply = await client.helo("crash")
            assert reply.status is Status.TEMPFAIL
            assert (await client.mail("<a@b>")).status is Status.TEMPFAIL  # no handler runs
    assert isinstance(info.value.__cause__, ZeroDivisionError)


async def test_a_panic_and_a_failing_test() -> None:
    with pytest.raises(MilterPanic) as info:
        async with open_in_memory(EVERYTHING) as client:
            await client.connect("mx", None)
            assert (await client.helo("crash")).status is Status.CONTINUE
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert any("AssertionError" in note for note in info.value.__notes__)


@triomilter.on_header
async def header_only(ctx: Context[None], name: str, value: str) -> Status:
    return Status.NOREPLY


NOREPLY_HEADERS = Milter("quiet", handlers=[header_only], protocol_opts=ProtocolOpts.NOREPLY_HEADER)


async def test_noreply_stage_of_a_real_milter() -> None:
    async with open_in_memory(NOREPLY_HEADERS) as client:
        assert await client.connect("mx", None) == StepReply(Status.CONTINUE, sent=False)
        await client.mail("<a@b>")
        assert await client.header("Subject", "x") == StepReply(Status.NOREPLY)
        result = await client.eom()
        assert (result.status, result.modifications) == (Status.CONTINUE, [])


async def test_send_message_against_a_real_milter() -> None:
    async with open_in_memory(EVERYTHING) as client:
        await client.connect("mx", None)
        result = await client.send_message(
            "<a@example.org>",
            ["<b@example.net>", "<c@example.net>"],
            {"Subject": "hi", "X-Old": "x"},
            b"hello\r\n",
        )
        assert result.has_added_header("X-Rcpts", re.compile("b@.*c@"))
        assert result.has_replaced_body(b"new body\r\n")
        result = await client.send_message("<a@b>", "<nobody@example.net>")
        assert (result.status, result.sent) == (Status.REJECT, False)


async def test_the_offer_is_configurable() -> None:
    milter = Milter("hdr", handlers=[eom], actions=Actions.ADD_HEADER)
    with pytest.raises(triomilter.testing.MilterClosed):
        # The milter needs ADD_HEADER; an MTA that does not offer it is refused.
        async with open_in_memory(milter, actions=Actions.QUARANTINE):
            pass  # pragma: no cover


# --- the pytest fixtures -------------------------------------------------------------------


@pytest.fixture
def milter() -> Milter:
    return EVERYTHING


async def test_milter_client_fixture(milter_client: MilterClient) -> None:
    assert (await milter_client.connect("mx", ("192.0.2.1", 25))).status is Status.CONTINUE
    assert (await milter_client.helo("mx")).status is Status.CONTINUE


async def test_milter_client_factory_fixture(
    milter_client_factory: OpenClient,
) -> None:
    # An MTA without NOREPLY_HEADER: the milter answers headers after all.
    offer = ALL_PROTOCOL_OPTS & ~ProtocolOpts.NOREPLY_HEADER
    async with milter_client_factory(NOREPLY_HEADERS, opts=offer) as client:
        assert not client.negotiated_opts & ProtocolOpts.NOREPLY_HEADER
        await client.mail("<a@b>")
        assert await client.header("Subject", "x") == StepReply(Status.CONTINUE)
