"""End-of-message changes: decoded in order, with matchers."""

from __future__ import annotations

import re

import pytest

from triomilter import Status
from triomilter.protocol import (
    CONTINUE,
    PROGRESS,
    REJECT,
    Command,
    EndOfMessage,
    MilterConnection,
    ReplyWithCode,
)
from triomilter.protocol import AddHeader as WireAddHeader
from triomilter.protocol import AddRecipient as WireAddRecipient
from triomilter.protocol import AddRecipientExt as WireAddRecipientExt
from triomilter.protocol import ChangeHeader as WireChangeHeader
from triomilter.protocol import ChangeSender as WireChangeSender
from triomilter.protocol import DeleteRecipient as WireDeleteRecipient
from triomilter.protocol import InsertHeader as WireInsertHeader
from triomilter.protocol import Quarantine as WireQuarantine
from triomilter.protocol import ReplaceBody as WireReplaceBody
from triomilter.testing import (
    ANY,
    AddHeader,
    AddRecipient,
    EomReply,
    InsertHeader,
    MilterClient,
    Quarantine,
    RemoveRecipient,
    ReplaceBody,
    ReplaceHeader,
    ReplaceSender,
)

from ._responder import Answer, Responder, session


def at_eom(*answer: object) -> Responder:
    def script(command: Command, conn: MilterConnection) -> Answer | None:
        return list(answer) if isinstance(command, EndOfMessage) else None  # type: ignore[arg-type]

    return Responder(script=script)


async def message(client: MilterClient) -> EomReply:
    await client.connect("mx", None)
    await client.mail("<a@b>")
    await client.rcpt("<b@c>")
    return await client.eom()


EVERY_CHANGE = (
    WireAddHeader(b"X-Tag", b"yes"),
    WireInsertHeader(0, b"X-First", b"top"),
    PROGRESS,
    WireChangeHeader(2, b"Subject", b"[SPAM] hi"),
    WireChangeHeader(1, b"X-Old", b""),
    WireAddRecipient(b"<c@d>"),
    WireAddRecipientExt(b"<e@f>", b"NOTIFY=NEVER"),
    WireAddRecipientExt(b"<g@h>"),
    WireDeleteRecipient(b"<b@c>"),
    WireChangeSender(b"<new@b>", b"RET=HDRS"),
    WireChangeSender(b"<newer@b>"),
    WireQuarantine(b"looks bad"),
    PROGRESS,
    WireReplaceBody(b"new "),
    WireReplaceBody(b"body\r\n"),
    CONTINUE,
)


async def test_every_change_is_decoded_in_order() -> None:
    async with session(at_eom(*EVERY_CHANGE)) as client:
        result = await message(client)
    assert (result.status, result.sent, result.progress) == (Status.CONTINUE, True, 2)
    assert result.modifications == [
        AddHeader("X-Tag", "yes"),
        InsertHeader(0, "X-First", "top"),
        ReplaceHeader("Subject", 2, "[SPAM] hi"),
        ReplaceHeader("X-Old", 1, None),
        AddRecipient("<c@d>"),
        AddRecipient("<e@f>", "NOTIFY=NEVER"),
        AddRecipient("<g@h>"),
        RemoveRecipient("<b@c>"),
        ReplaceSender("<new@b>", "RET=HDRS"),
        ReplaceSender("<newer@b>"),
        Quarantine("looks bad"),
        ReplaceBody(b"new body\r\n", (b"new ", b"body\r\n")),
    ]
    assert result.replaced_body == b"new body\r\n"


async def test_matchers() -> None:
    async with session(at_eom(*EVERY_CHANGE)) as client:
        r = await message(client)

    assert r.has_added_header("X-Tag", "yes")
    assert r.has_added_header("x-tag")  # header names ignore case
    assert r.has_added_header(b"X-TAG", b"yes")
    assert r.has_added_header(re.compile("^X-"), re.compile("y.s"))
    assert r.has_added_header(ANY, lambda value: value.startswith("y"))
    assert not r.has_added_header("X-Tag", "no")
    assert not r.has_added_header("X-First")  # inserted, not added

    assert r.has_inserted_header("X-First", "top", index=0)
    assert r.has_inserted_header("X-First", index=lambda i: i < 1)
    assert not r.has_inserted_header("X-First", index=1)

    assert r.has_replaced_header("Subject", re.compile(r"^\[SPAM\]"), index=2)
    assert r.has_replaced_header("X-Old")  # ANY value: a deletion is a replacement too
    assert r.has_replaced_header("X-Old", None, index=1)  # None: a deletion only
    assert not r.has_replaced_header("Subject", None)

    assert r.has_added_recipient("<c@d>", None)  # None: without ESMTP arguments
    assert r.has_added_recipient("<e@f>", "NOTIFY=NEVER")
    assert r.has_added_recipient("<e@f>")
    assert not r.has_added_recipient("<e@f>", None)
    assert r.has_removed_recipient("<b@c>")
    assert not r.has_removed_recipient("<c@d>")

    assert r.has_replaced_sender("<new@b>", re.compile(b"RET="))
    assert r.has_replaced_sender("<newer@b>", None)
    assert not r.has_replaced_sender("<old@b>")

    assert r.has_quarantine()
    assert r.has_quarantine(re.compile("bad"))
    assert not r.has_quarantine("good")

    assert r.has_replaced_body()
    assert r.has_replaced_body(b"new body\r\n")
    assert r.has_replaced_body("new body\r\n")
    assert r.has_replaced_body(re.compile(rb"body\r\n$"))
    assert r.has_replaced_body(lambda body: len(body) == 10)
    assert not r.has_replaced_body(b"old body")


async def test_no_changes() -> None:
    async with session(Responder()) as client:
        r = await message(client)
    assert r.modifications == []
    assert r.replaced_body is None
    assert not r.has_added_header(ANY)
    assert not r.has_replaced_body()
    assert not r.has_quarantine()


async def test_text_that_is_not_utf8_survives() -> None:
    async with session(at_eom(WireAddHeader(b"X-Raw", b"caf\xe9"), CONTINUE)) as client:
        r = await message(client)
    assert r.has_added_header("X-Raw", b"caf\xe9")
    (change,) = r.modifications
    assert isinstance(change, AddHeader)
    assert change.value.encode("utf-8", "surrogateescape") == b"caf\xe9"


async def test_changes_with_a_custom_final_reply() -> None:
    reply = ReplyWithCode(b"550 5.7.1 Spam")
    async with session(at_eom(WireQuarantine(b"spam"), reply)) as client:
        r = await message(client)
    assert (r.status, r.smtp_code, r.lines) == (Status.REJECT, 550, ["Spam"])
    assert r.has_quarantine("spam")


async def test_changes_then_reject() -> None:
    async with session(at_eom(WireAddHeader(b"X-A", b"1"), REJECT)) as client:
        r = await message(client)
    assert r.status is Status.REJECT
    assert r.modifications == [AddHeader("X-A", "1")]


async def test_a_large_replacement_body() -> None:
    body = b"0123456789" * 20_000
    chunks = [body[i : i + 65535] for i in range(0, len(body), 65535)]
    async with session(at_eom(*map(WireReplaceBody, chunks), CONTINUE)) as client:
        r = await message(client)
    assert r.modifications == [ReplaceBody(body, tuple(chunks))]


@pytest.mark.parametrize("matcher", [ANY, "yes", b"yes", re.compile("e"), str.isalpha])
async def test_matcher_kinds(matcher: object) -> None:
    async with session(at_eom(WireAddHeader(b"X-Tag", b"yes"), CONTINUE)) as client:
        r = await message(client)
    assert r.has_added_header("X-Tag", matcher)  # type: ignore[arg-type]
