"""End-of-message actions (SPEC §2.3, protocol.md §2.2, §6, §8).

Valid actions reach the MTA as typed modifications with the exact wire
bytes, written together with the final reply; invalid ones raise the right
`MilterError` subclass and send nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from triomilter import (
    ActionNotNegotiated,
    Actions,
    Context,
    ContextApi,
    Err,
    Handler,
    InvalidArgument,
    MilterError,
    Ok,
    Result,
    StageError,
    Status,
    on_body,
    on_eom,
    on_header,
    on_helo,
    on_mail,
    on_rcpt,
)
from triomilter import Milter as M
from triomilter.protocol import ALL_ACTIONS
from triomilter.testing import (
    AddHeader,
    AddRecipient,
    InsertHeader,
    Quarantine,
    RemoveRecipient,
    ReplaceBody,
    ReplaceHeader,
    ReplaceSender,
    StepReply,
)

from ._support import OpenMilter, open_sniffed, packet

ALL = ALL_ACTIONS & ~Actions.REQUEST_MACROS
Action = Callable[[ContextApi], Awaitable[None]]


async def everything(api: ContextApi) -> None:
    await api.add_header("X-Added", "yes")
    await api.add_header(b"X-Raw", b"\xff 8-bit")
    await api.add_header("X-Folded", "one\n\ttwo\n three")
    await api.insert_header(0, "X-First", "top")
    await api.insert_header(3, b"X-Third", "3")
    await api.replace_header("Subject", 1, "[tagged] hi")
    await api.replace_header(b"Subject", 2, b"second")
    await api.replace_header("X-Old", 1, None)
    await api.add_recipient("<copy@example.net>")
    await api.add_recipient(b"<dsn@example.net>", "NOTIFY=NEVER ORCPT=rfc822;x@y")
    await api.remove_recipient("<b@example.net>")
    await api.replace_sender("<bounce@example.org>")
    await api.replace_sender(b"<verp@example.org>", b"RET=HDRS")
    await api.quarantine("held for review")
    await api.append_body_chunk(b"new ")
    await api.append_body_chunk("body\r\n")


EVERYTHING = [
    AddHeader("X-Added", "yes"),
    AddHeader("X-Raw", b"\xff 8-bit".decode("utf-8", "surrogateescape")),
    AddHeader("X-Folded", "one\n\ttwo\n three"),
    InsertHeader(0, "X-First", "top"),
    InsertHeader(3, "X-Third", "3"),
    ReplaceHeader("Subject", 1, "[tagged] hi"),
    ReplaceHeader("Subject", 2, "second"),
    ReplaceHeader("X-Old", 1, None),
    AddRecipient("<copy@example.net>"),
    AddRecipient("<dsn@example.net>", "NOTIFY=NEVER ORCPT=rfc822;x@y"),
    RemoveRecipient("<b@example.net>"),
    ReplaceSender("<bounce@example.org>"),
    ReplaceSender("<verp@example.org>", "RET=HDRS"),
    Quarantine("held for review"),
    ReplaceBody(b"new body\r\n", (b"new ", b"body\r\n")),
]

EVERYTHING_ON_THE_WIRE = b"".join(
    [
        packet(b"h", b"X-Added\0yes\0"),
        packet(b"h", b"X-Raw\0\xff 8-bit\0"),
        packet(b"h", b"X-Folded\0one\n\ttwo\n three\0"),
        packet(b"i", b"\0\0\0\0X-First\0top\0"),
        packet(b"i", b"\0\0\0\3X-Third\x003\0"),
        packet(b"m", b"\0\0\0\1Subject\0[tagged] hi\0"),
        packet(b"m", b"\0\0\0\2Subject\0second\0"),
        packet(b"m", b"\0\0\0\1X-Old\0\0"),
        packet(b"+", b"<copy@example.net>\0"),
        packet(b"2", b"<dsn@example.net>\0NOTIFY=NEVER ORCPT=rfc822;x@y\0"),
        packet(b"-", b"<b@example.net>\0"),
        packet(b"e", b"<bounce@example.org>\0"),
        packet(b"e", b"<verp@example.org>\0RET=HDRS\0"),
        packet(b"q", b"held for review\0"),
        packet(b"b", b"new "),
        packet(b"b", b"body\r\n"),
        packet(b"c"),
    ]
)


def eom_milter(action: Action, actions: Actions = ALL, status: Status = Status.CONTINUE) -> M:
    @on_eom
    async def eom(ctx: Context[None]) -> Status:
        await action(ctx.api)
        return status

    return M("eom", handlers=[eom], actions=actions)


async def test_every_action_as_a_typed_modification(open_milter: OpenMilter) -> None:
    async with open_milter(eom_milter(everything)) as client:
        result = await client.send_message("<a@example.org>", "<b@example.net>", body=b"old\r\n")
    assert result.status is Status.CONTINUE
    assert result.modifications == EVERYTHING
    assert result.has_added_header(b"X-Raw", b"\xff 8-bit")
    assert result.has_added_recipient("<copy@example.net>", None)
    assert result.has_replaced_sender("<verp@example.org>", "RET=HDRS")
    assert result.replaced_body == b"new body\r\n"


async def test_every_action_on_the_wire_in_one_write() -> None:
    async with open_sniffed(eom_milter(everything)) as (client, writes):
        await client.connect("mx", None)
        await client.mail("<a@b>")
        before = len(writes)
        result = await client.eom()
    assert result.modifications == EVERYTHING
    # Changes are written together with the final reply: one write.
    assert writes[before:] == [EVERYTHING_ON_THE_WIRE]


async def test_progress_is_sent_at_once_and_counted() -> None:
    async def progress(api: ContextApi) -> None:
        await api.add_header("X-A", "1")
        await api.signal_progress()
        await api.signal_progress()
        await api.add_header("X-B", "2")

    async with open_sniffed(eom_milter(progress)) as (client, writes):
        await client.mail("<a@b>")
        before = len(writes)
        result = await client.eom()
    assert result.progress == 2
    assert result.modifications == [AddHeader("X-A", "1"), AddHeader("X-B", "2")]
    assert writes[before:] == [
        packet(b"h", b"X-A\x001\0") + packet(b"p"),
        packet(b"p"),
        packet(b"h", b"X-B\x002\0") + packet(b"c"),
    ]


@pytest.mark.parametrize(
    ("size", "calls"),
    [
        (65535, 1),
        (65536, 1),
        (100_000, 1),
        (200_000, 1),
        (150_000, 3),
    ],
)
async def test_large_body_in_65535_byte_chunks(
    open_milter: OpenMilter, size: int, calls: int
) -> None:
    body = bytes(i % 251 for i in range(size))
    per_call = -(-size // calls)

    async def replace(api: ContextApi) -> None:
        for start in range(0, size, per_call):
            await api.append_body_chunk(body[start : start + per_call])

    async with open_milter(eom_milter(replace)) as client:
        result = await client.send_message("<a@b>", "<c@d>", body=b"x\r\n")
    (change,) = result.modifications
    assert isinstance(change, ReplaceBody)
    assert change.body == body
    assert all(len(chunk) <= 65535 for chunk in change.chunks)
    expected: list[int] = []
    for start in range(0, size, per_call):
        piece = min(per_call, size - start)
        expected += [65535] * (piece // 65535) + ([piece % 65535] if piece % 65535 else [])
    assert [len(chunk) for chunk in change.chunks] == expected


async def test_large_body_wire_chunks_in_order() -> None:
    body = b"a" * 65535 + b"b" * 65535 + b"c" * 34465

    async def replace(api: ContextApi) -> None:
        await api.append_body_chunk(body)

    async with open_sniffed(eom_milter(replace)) as (client, writes):
        await client.mail("<a@b>")
        before = len(writes)
        await client.eom()
    assert b"".join(writes[before:]) == (
        packet(b"b", b"a" * 65535)
        + packet(b"b", b"b" * 65535)
        + packet(b"b", b"c" * 34465)
        + packet(b"c")
    )


@pytest.mark.parametrize("status", [Status.TEMPFAIL, Status.REJECT, Status.ACCEPT, Status.DISCARD])
async def test_the_final_status_goes_with_the_changes(
    open_milter: OpenMilter, status: Status
) -> None:
    async def add(api: ContextApi) -> None:
        await api.add_header("X-A", "1")

    async with open_milter(eom_milter(add, status=status)) as client:
        result = await client.send_message("<a@b>", "<c@d>")
    assert result.status is status
    # A TEMPFAIL at end of message drops the queued changes.
    expected = [] if status is Status.TEMPFAIL else [AddHeader("X-A", "1")]
    assert result.modifications == expected


@on_eom
async def eom_err(ctx: Context[None]) -> Result[Status]:
    await ctx.api.add_header("X-A", "1")
    await ctx.api.add_recipient("<r@x>")
    if ctx.api.macro_value("mode") == "custom":
        ctx.api.set_error_reply("451", "4.3.0", "try later")
        return Ok(Status.TEMPFAIL)
    return Err("the database is down")


@pytest.mark.parametrize("mode", ["err", "custom"])
async def test_a_tempfail_at_eom_drops_queued_changes(open_milter: OpenMilter, mode: str) -> None:
    async with open_milter(M("err", handlers=[eom_err], actions=ALL)) as client:
        await client.mail("<a@b>")
        result = await client.eom(macros={"mode": mode})
    assert result.status is Status.TEMPFAIL
    assert result.modifications == []
    assert result.text == ("451 4.3.0 try later" if mode == "custom" else None)


async def test_an_invalid_status_at_eom_drops_queued_changes(open_milter: OpenMilter) -> None:
    async def add(api: ContextApi) -> None:
        await api.add_header("X-A", "1")

    async with open_milter(eom_milter(add, status=Status.SKIP)) as client:
        result = await client.send_message("<a@b>", "<c@d>")
    assert (result.status, result.modifications) == (Status.TEMPFAIL, [])


# --- validation ------------------------------------------------------------------------------

INVALID: list[tuple[str, Callable[[ContextApi], Awaitable[None]], type[MilterError]]] = [
    # NUL bytes
    ("nul-in-name", lambda api: api.add_header("X-A\0", "v"), InvalidArgument),
    ("nul-in-value", lambda api: api.add_header("X-A", "a\0b"), InvalidArgument),
    ("nul-in-rcpt", lambda api: api.add_recipient(b"<a\0@b>"), InvalidArgument),
    ("nul-in-sender", lambda api: api.replace_sender("<a@b>\0"), InvalidArgument),
    ("nul-in-reason", lambda api: api.quarantine("a\0b"), InvalidArgument),
    # CR/LF where forbidden
    ("crlf-in-value", lambda api: api.add_header("X-A", "a\r\n b"), InvalidArgument),
    ("cr-in-value", lambda api: api.insert_header(0, "X-A", "a\rb"), InvalidArgument),
    ("lf-in-rcpt", lambda api: api.add_recipient("<a@b>\n"), InvalidArgument),
    ("lf-in-rcpt-args", lambda api: api.add_recipient("<a@b>", "A=1\nB=2"), InvalidArgument),
    ("cr-in-removed", lambda api: api.remove_recipient("<a@b>\r"), InvalidArgument),
    ("lf-in-sender", lambda api: api.replace_sender("<a\n@b>"), InvalidArgument),
    ("cr-in-sender-args", lambda api: api.replace_sender("<a@b>", "RET=HDRS\r"), InvalidArgument),
    ("lf-in-reason", lambda api: api.quarantine("line\nbreak"), InvalidArgument),
    # bare LF not followed by whitespace (folding only)
    ("bare-lf", lambda api: api.add_header("X-A", "a\nb"), InvalidArgument),
    ("trailing-lf", lambda api: api.add_header("X-A", "a\n"), InvalidArgument),
    ("bare-lf-replace", lambda api: api.replace_header("X-A", 1, "a\nb"), InvalidArgument),
    # header names
    ("name-space", lambda api: api.add_header("X A", "v"), InvalidArgument),
    ("name-colon", lambda api: api.add_header("X:A", "v"), InvalidArgument),
    ("name-empty", lambda api: api.add_header("", "v"), InvalidArgument),
    ("name-non-ascii", lambda api: api.add_header("X-\xe9", "v"), InvalidArgument),
    ("name-tab", lambda api: api.insert_header(0, "X\tA", "v"), InvalidArgument),
    ("name-replace", lambda api: api.replace_header("X A", 1, None), InvalidArgument),
    # header indexes
    ("insert-negative", lambda api: api.insert_header(-1, "X-A", "v"), InvalidArgument),
    ("replace-zero", lambda api: api.replace_header("X-A", 0, "v"), InvalidArgument),
    ("replace-negative", lambda api: api.replace_header("X-A", -3, None), InvalidArgument),
    ("index-too-big", lambda api: api.insert_header(2**32, "X-A", "v"), InvalidArgument),
    ("index-str", lambda api: api.insert_header("0", "X-A", "v"), InvalidArgument),  # type: ignore[arg-type]
    ("index-bool", lambda api: api.replace_header("X-A", True, "v"), InvalidArgument),
    ("replace-empty-value", lambda api: api.replace_header("X-A", 1, ""), InvalidArgument),
    # empty strings
    ("empty-rcpt", lambda api: api.add_recipient(""), InvalidArgument),
    ("empty-rcpt-ext", lambda api: api.add_recipient(b"", "NOTIFY=NEVER"), InvalidArgument),
    ("empty-removed", lambda api: api.remove_recipient(""), InvalidArgument),
    ("empty-sender", lambda api: api.replace_sender(""), InvalidArgument),
    # types
    ("int-name", lambda api: api.add_header(1, "v"), InvalidArgument),  # type: ignore[arg-type]
    ("none-value", lambda api: api.add_header("X-A", None), InvalidArgument),  # type: ignore[arg-type]
    ("list-rcpt", lambda api: api.add_recipient(["<a@b>"]), InvalidArgument),  # type: ignore[arg-type]
    ("int-body", lambda api: api.append_body_chunk(42), InvalidArgument),  # type: ignore[arg-type]
    ("int-reason", lambda api: api.quarantine(1.5), InvalidArgument),  # type: ignore[arg-type]
    ("unencodable", lambda api: api.add_header("X-A", "\udcff"), InvalidArgument),
]


@pytest.mark.parametrize(
    ("call", "error"), [(call, error) for _, call, error in INVALID], ids=[i for i, _, _ in INVALID]
)
async def test_invalid_arguments_raise_and_send_nothing(
    open_milter: OpenMilter, call: Action, error: type[MilterError]
) -> None:
    raised: list[BaseException] = []

    async def action(api: ContextApi) -> None:
        with pytest.raises(MilterError) as info:
            await call(api)
        raised.append(info.value)

    async with open_milter(eom_milter(action)) as client:
        result = await client.send_message("<a@b>", "<c@d>")
    assert (result.status, result.modifications) == (Status.CONTINUE, [])
    (exc,) = raised
    assert type(exc) is error
    if error is InvalidArgument:
        assert isinstance(exc, ValueError)


def api_calls() -> list[tuple[str, Action]]:
    return [
        ("add_header", lambda api: api.add_header("X-A", "v")),
        ("insert_header", lambda api: api.insert_header(0, "X-A", "v")),
        ("replace_header", lambda api: api.replace_header("X-A", 1, "v")),
        ("delete_header", lambda api: api.replace_header("X-A", 1, None)),
        ("add_recipient", lambda api: api.add_recipient("<a@b>")),
        ("add_recipient_ext", lambda api: api.add_recipient("<a@b>", "NOTIFY=NEVER")),
        ("remove_recipient", lambda api: api.remove_recipient("<a@b>")),
        ("replace_sender", lambda api: api.replace_sender("<a@b>")),
        ("append_body_chunk", lambda api: api.append_body_chunk(b"x")),
        ("quarantine", lambda api: api.quarantine("why")),
        ("signal_progress", lambda api: api.signal_progress()),
    ]


API_CALLS = api_calls()


@pytest.mark.parametrize("stage", ["helo", "mail", "rcpt", "header", "body"])
@pytest.mark.parametrize("call", [c for _, c in API_CALLS], ids=[n for n, _ in API_CALLS])
async def test_actions_outside_eom_raise_stage_error(
    open_milter: OpenMilter, stage: str, call: Action
) -> None:
    raised: list[BaseException] = []

    async def attempt(ctx: Context[None]) -> Status:
        try:
            await call(ctx.api)
        except MilterError as exc:
            raised.append(exc)
        return Status.CONTINUE

    @on_helo
    async def helo(ctx: Context[None], hostname: str) -> Status:
        return await attempt(ctx)

    @on_mail
    async def mail(ctx: Context[None], args: list[str]) -> Status:
        return await attempt(ctx)

    @on_rcpt
    async def rcpt(ctx: Context[None], args: list[str]) -> Status:
        return await attempt(ctx)

    @on_header
    async def header(ctx: Context[None], name: str, value: str) -> Status:
        return await attempt(ctx)

    @on_body
    async def body(ctx: Context[None], chunk: bytes) -> Status:
        return await attempt(ctx)

    handlers: dict[str, Handler[Any, object]] = {
        "helo": helo,
        "mail": mail,
        "rcpt": rcpt,
        "header": header,
        "body": body,
    }
    handler = handlers[stage]
    async with open_milter(M("early", handlers=[handler], actions=ALL)) as client:
        await client.helo("mx")
        # Anything sent outside end of message would break the client's session.
        result = await client.send_message("<a@b>", "<c@d>", {"Subject": "s"}, b"body\r\n")
        assert (result.status, result.modifications) == (Status.CONTINUE, [])
    (exc,) = raised
    assert type(exc) is StageError
    assert f"on_{stage}" in str(exc)


NEEDS: list[tuple[str, Action, Actions]] = [
    ("add_header", lambda api: api.add_header("X-A", "v"), Actions.ADD_HEADER),
    ("insert_header", lambda api: api.insert_header(0, "X-A", "v"), Actions.ADD_HEADER),
    ("replace_header", lambda api: api.replace_header("X-A", 1, "v"), Actions.REPLACE_HEADER),
    ("delete_header", lambda api: api.replace_header("X-A", 1, None), Actions.REPLACE_HEADER),
    ("add_recipient", lambda api: api.add_recipient("<a@b>"), Actions.ADD_RECIPIENT),
    (
        "add_recipient_ext",
        lambda api: api.add_recipient("<a@b>", "NOTIFY=NEVER"),
        Actions.ADD_RECIPIENT_EXT,
    ),
    ("remove_recipient", lambda api: api.remove_recipient("<a@b>"), Actions.REMOVE_RECIPIENT),
    ("replace_sender", lambda api: api.replace_sender("<a@b>"), Actions.REPLACE_SENDER),
    ("append_body_chunk", lambda api: api.append_body_chunk(b"x"), Actions.REPLACE_BODY),
    ("quarantine", lambda api: api.quarantine("why"), Actions.QUARANTINE),
]


@pytest.mark.parametrize(
    ("call", "needed"), [(c, a) for _, c, a in NEEDS], ids=[n for n, _, _ in NEEDS]
)
async def test_actions_not_negotiated_raise(
    open_milter: OpenMilter, call: Action, needed: Actions
) -> None:
    outcomes: list[object] = []

    async def action(api: ContextApi) -> None:
        try:
            await call(api)
        except MilterError as exc:
            outcomes.append(exc)
        else:
            outcomes.append("sent")

    # Everything else is negotiated, only the needed action is missing.
    async with open_milter(eom_milter(action, actions=ALL & ~needed)) as client:
        assert not client.negotiated_actions & needed
        result = await client.send_message("<a@b>", "<c@d>")
        assert (result.status, result.modifications) == (Status.CONTINUE, [])
        # ...and with only that action, it works.
    async with open_milter(eom_milter(action, actions=needed)) as client:
        result = await client.send_message("<a@b>", "<c@d>")
        assert result.status is Status.CONTINUE
        assert len(result.modifications) == 1
    assert type(outcomes[0]) is ActionNotNegotiated
    assert needed.name is not None and needed.name in str(outcomes[0])
    assert outcomes[1] == "sent"


async def test_signal_progress_needs_no_action(open_milter: OpenMilter) -> None:
    async def progress(api: ContextApi) -> None:
        await api.signal_progress()

    async with open_milter(eom_milter(progress, actions=Actions.NONE)) as client:
        result = await client.send_message("<a@b>", "<c@d>")
    assert (result.status, result.progress) == (Status.CONTINUE, 1)


async def test_body_chunks_must_be_contiguous(open_milter: OpenMilter) -> None:
    raised: list[BaseException] = []

    async def mixed(api: ContextApi) -> None:
        await api.add_header("X-Before", "ok")  # before the run: fine
        await api.append_body_chunk(b"one ")
        await api.signal_progress()  # progress does not break the run
        await api.append_body_chunk(b"two")
        await api.add_header("X-A", "v")
        with pytest.raises(MilterError) as info:
            await api.append_body_chunk(b"three")
        raised.append(info.value)

    async with open_milter(eom_milter(mixed)) as client:
        result = await client.send_message("<a@b>", "<c@d>")
    assert result.status is Status.CONTINUE
    assert result.modifications == [
        AddHeader("X-Before", "ok"),
        ReplaceBody(b"one two", (b"one ", b"two")),
        AddHeader("X-A", "v"),
    ]
    assert "contiguous" in str(raised[0])


async def test_empty_body_chunk_sends_nothing(open_milter: OpenMilter) -> None:
    async def empty(api: ContextApi) -> None:
        await api.append_body_chunk(b"")

    async with open_milter(eom_milter(empty)) as client:
        result = await client.send_message("<a@b>", "<c@d>")
    assert result.modifications == []


@pytest.mark.parametrize("args", [None, "NOTIFY=NEVER"])
async def test_recipient_with_and_without_esmtp_args(
    open_milter: OpenMilter, args: str | None
) -> None:
    async def add(api: ContextApi) -> None:
        await api.add_recipient("<new@example.net>", args)
        await api.replace_sender("<new@example.org>", args)

    async with open_milter(eom_milter(add)) as client:
        result = await client.send_message("<a@b>", "<c@d>")
    assert result.modifications == [
        AddRecipient("<new@example.net>", args),
        ReplaceSender("<new@example.org>", args),
    ]


async def test_actions_are_kept_per_message(open_milter: OpenMilter) -> None:
    """Changes of one message do not leak into the next."""
    count = 0

    async def add(api: ContextApi) -> None:
        nonlocal count
        count += 1
        await api.add_header("X-Count", str(count))

    async with open_milter(eom_milter(add)) as client:
        first = await client.send_message("<a@b>", "<c@d>")
        await client.abort()
        second = await client.send_message("<a@b>", "<c@d>")
    assert first.modifications == [AddHeader("X-Count", "1")]
    assert second.modifications == [AddHeader("X-Count", "2")]


async def test_eom_handler_may_be_a_plain_function_for_validation() -> None:
    """A sync on_eom cannot await actions, but its status works like any other."""

    @on_eom
    def eom(ctx: Context[None]) -> Status:
        return Status.DISCARD

    async with open_sniffed(M("sync", handlers=[eom])) as (client, writes):
        result = await client.send_message("<a@b>", "<c@d>")
    assert result.status is Status.DISCARD
    assert writes[-1] == packet(b"d")


async def test_modification_replies_are_never_sent_outside_eom(open_milter: OpenMilter) -> None:
    @on_rcpt
    async def rcpt(ctx: Context[None], args: list[str]) -> Result[Status]:
        # An uncaught StageError in a Result handler: TEMPFAIL for this recipient.
        await ctx.api.add_header("X-A", "v")
        return Ok(Status.CONTINUE)  # pragma: no cover

    async with open_milter(M("early", handlers=[rcpt], actions=ALL)) as client:
        await client.mail("<a@b>")
        assert await client.rcpt("<c@d>") == StepReply(Status.TEMPFAIL)
        assert await client.rcpt("<e@f>") == StepReply(Status.TEMPFAIL)
