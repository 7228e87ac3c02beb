"""Every status at every stage (protocol.md §6, SPEC §2.2).

A valid status produces its reply; an invalid one (DISCARD at connect/HELO,
SKIP outside the body or without negotiation, NOREPLY without its
``NOREPLY_*`` step, ALL_OPTS outside negotiation, not a Status at all) is
answered TEMPFAIL and logged as an error. With ``NOREPLY_*`` negotiated the
stage sends nothing; asked for but not offered, NOREPLY is answered CONTINUE.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest

from triomilter import (
    Context,
    Err,
    Milter,
    Ok,
    ProtocolOpts,
    Result,
    SocketInfo,
    Status,
    on_body,
    on_connect,
    on_data,
    on_eoh,
    on_eom,
    on_header,
    on_helo,
    on_mail,
    on_rcpt,
    on_unknown,
)
from triomilter.protocol import NOREPLY_OPTS
from triomilter.testing import POSTFIX_OPTS, EomReply, MilterClient, StepReply

from ._support import OpenMilter, errors

STAGES = ["connect", "helo", "mail", "rcpt", "data", "header", "eoh", "body", "eom", "unknown"]
_CONNECTION = {Status.CONTINUE, Status.REJECT, Status.TEMPFAIL, Status.ACCEPT}
_MESSAGE = _CONNECTION | {Status.DISCARD}
VALID: dict[str, set[Status]] = {
    "connect": _CONNECTION,
    "helo": _CONNECTION,
    "mail": _MESSAGE,
    "rcpt": _MESSAGE,
    "data": _MESSAGE,
    "header": _MESSAGE,
    "eoh": _MESSAGE,
    "body": _MESSAGE | {Status.SKIP},  # SKIP: when negotiated
    "eom": _MESSAGE,
    "unknown": {Status.CONTINUE, Status.REJECT, Status.TEMPFAIL},
}
NOREPLY_OF_STAGE = {
    "connect": ProtocolOpts.NOREPLY_CONNECT,
    "helo": ProtocolOpts.NOREPLY_HELO,
    "mail": ProtocolOpts.NOREPLY_MAIL,
    "rcpt": ProtocolOpts.NOREPLY_RCPT,
    "data": ProtocolOpts.NOREPLY_DATA,
    "header": ProtocolOpts.NOREPLY_HEADER,
    "eoh": ProtocolOpts.NOREPLY_EOH,
    "body": ProtocolOpts.NOREPLY_BODY,
    "unknown": ProtocolOpts.NOREPLY_UNKNOWN,
}


def milter_for(
    stage: str,
    answer: Callable[[], Any],
    *,
    opts: ProtocolOpts = ProtocolOpts.SKIP,
    calls: list[str] | None = None,
) -> Milter:
    """A milter with one handler, for ``stage``, returning ``answer()``."""
    calls = calls if calls is not None else []

    def result() -> Any:
        calls.append(stage)
        return answer()

    @on_connect
    async def connect(ctx: Context[None], hostname: str, address: SocketInfo | None) -> Status:
        return result()  # type: ignore[no-any-return]

    @on_helo
    async def helo(ctx: Context[None], hostname: str) -> Status:
        return result()  # type: ignore[no-any-return]

    @on_mail
    async def mail(ctx: Context[None], args: list[str]) -> Status:
        return result()  # type: ignore[no-any-return]

    @on_rcpt
    async def rcpt(ctx: Context[None], args: list[str]) -> Status:
        return result()  # type: ignore[no-any-return]

    @on_data
    async def data(ctx: Context[None]) -> Status:
        return result()  # type: ignore[no-any-return]

    @on_header
    async def header(ctx: Context[None], name: str, value: str) -> Status:
        return result()  # type: ignore[no-any-return]

    @on_eoh
    async def eoh(ctx: Context[None]) -> Status:
        return result()  # type: ignore[no-any-return]

    @on_body
    async def body(ctx: Context[None], chunk: bytes) -> Status:
        return result()  # type: ignore[no-any-return]

    @on_eom
    async def eom(ctx: Context[None]) -> Status:
        return result()  # type: ignore[no-any-return]

    @on_unknown
    async def unknown(ctx: Context[None], command: str) -> Status:
        return result()  # type: ignore[no-any-return]

    handler = locals()[stage]
    return Milter(f"{stage}-status", handlers=[handler], protocol_opts=opts)


async def step(client: MilterClient, stage: str) -> StepReply:
    """Go through the SMTP steps up to ``stage`` and return its reply.

    The milter has only ``stage``'s handler: every other step is disabled
    by ``NO_*`` and not sent.
    """
    if stage == "connect":
        return await client.connect("mx.example", ("192.0.2.1", 25))
    await client.connect("mx.example", ("192.0.2.1", 25))
    if stage == "helo":
        return await client.helo("mx.example")
    if stage == "unknown":
        return await client.unknown("XYZZY")
    if stage == "mail":
        return await client.mail("<a@example.org>")
    await client.mail("<a@example.org>")
    if stage == "rcpt":
        return await client.rcpt("<b@example.net>")
    await client.rcpt("<b@example.net>")
    if stage == "data":
        return await client.data()
    await client.data()
    if stage == "header":
        return await client.header("Subject", "hi")
    await client.header("Subject", "hi")
    if stage == "eoh":
        return await client.eoh()
    await client.eoh()
    if stage == "body":
        return await client.body(b"body\r\n")
    await client.body(b"body\r\n")
    return await client.eom()


def parts(reply: StepReply) -> tuple[Status, str | None, bool]:
    """What a reply says, for a `StepReply` or an `EomReply` alike."""
    return reply.status, reply.text, reply.sent


async def finish(client: MilterClient, stage: str) -> EomReply:
    """End of message after `step` (a whole message if none is open)."""
    if stage in ("connect", "helo", "unknown"):
        return await client.send_message("<x@example.org>", "<y@example.net>")
    return await client.eom()


@pytest.mark.parametrize("status", list(Status), ids=lambda s: s.name)
@pytest.mark.parametrize("stage", STAGES)
async def test_every_status_at_every_stage(
    open_milter: OpenMilter, stage: str, status: Status, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, "triomilter")
    async with open_milter(milter_for(stage, lambda: status)) as client:
        reply = await step(client, stage)
    if status in VALID[stage]:
        assert parts(reply) == (status, None, True)
        assert errors(caplog) == []
    else:
        assert parts(reply) == (Status.TEMPFAIL, None, True)
        assert any(
            f"{status.name} is not a valid status here" in message for message in errors(caplog)
        )


@pytest.mark.parametrize("stage", STAGES)
async def test_ok_wrapped_statuses(open_milter: OpenMilter, stage: str) -> None:
    status = Status.REJECT
    async with open_milter(milter_for(stage, lambda: Ok(status))) as client:
        assert parts(await step(client, stage)) == (status, None, True)


async def test_skip_without_negotiation_is_tempfail(
    open_milter: OpenMilter, caplog: pytest.LogCaptureFixture
) -> None:
    milter = milter_for("body", lambda: Status.SKIP, opts=ProtocolOpts.NONE)
    async with open_milter(milter) as client:
        assert not client.negotiated_opts & ProtocolOpts.SKIP
        assert await step(client, "body") == StepReply(Status.TEMPFAIL)
    assert any("SKIP is not a valid status" in message for message in errors(caplog))


async def test_skip_is_honoured_by_the_mta(open_milter: OpenMilter) -> None:
    calls: list[str] = []
    async with open_milter(milter_for("body", lambda: Status.SKIP, calls=calls)) as client:
        await client.connect("mx", None)
        await client.mail("<a@b>")
        assert await client.body(b"a" * 70_000) == StepReply(Status.SKIP)
        assert await client.body(b"more") == StepReply(Status.SKIP, sent=False)
        assert (await client.eom()).status is Status.CONTINUE
    assert calls == ["body"]  # the second 65535-byte chunk was not sent


@pytest.mark.parametrize(
    "value",
    [None, "continue", 0, Ok("continue"), (Status.CONTINUE,), Status.CONTINUE.value],
    ids=["None", "str", "int", "Ok-str", "tuple", "value"],
)
@pytest.mark.parametrize("stage", ["helo", "rcpt", "eom"])
async def test_not_a_status_is_tempfail(
    open_milter: OpenMilter, stage: str, value: object, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_milter(milter_for(stage, lambda: value)) as client:
        assert parts(await step(client, stage)) == (Status.TEMPFAIL, None, True)
        if stage == "rcpt":
            # A recipient-level failure: the message goes on.
            assert (await client.rcpt("<c@d>")).status is Status.TEMPFAIL
    assert any("not a Status" in message for message in errors(caplog))


# --- NOREPLY ---------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", list(NOREPLY_OF_STAGE))
async def test_noreply_with_its_step_negotiated_sends_nothing(
    open_milter: OpenMilter, stage: str, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []
    flag = NOREPLY_OF_STAGE[stage]
    milter = milter_for(stage, lambda: Status.NOREPLY, opts=flag, calls=calls)
    async with open_milter(milter) as client:
        assert client.negotiated_opts & flag
        assert await step(client, stage) == StepReply(Status.NOREPLY)
        # Nothing was sent: the next command's reply is its own (the client
        # reports a reply sent when none was due as a protocol error).
        if stage == "unknown":
            assert await client.unknown("AGAIN") == StepReply(Status.NOREPLY)
        assert (await finish(client, stage)).status is Status.CONTINUE
    assert calls.count(stage) >= 1
    assert errors(caplog) == []


@pytest.mark.parametrize("status", [Status.CONTINUE, Status.REJECT])
@pytest.mark.parametrize("stage", ["helo", "header", "body"])
async def test_a_reply_where_noreply_was_negotiated_is_not_sent(
    open_milter: OpenMilter, stage: str, status: Status, caplog: pytest.LogCaptureFixture
) -> None:
    milter = milter_for(stage, lambda: status, opts=NOREPLY_OF_STAGE[stage])
    async with open_milter(milter) as client:
        assert await step(client, stage) == StepReply(Status.NOREPLY)
        # The stream stays in sync; a refusal nobody heard makes the message TEMPFAIL.
        finished = Status.CONTINUE if status is Status.CONTINUE else Status.TEMPFAIL
        assert await finish(client, stage) == EomReply(finished)
    assert any("negotiated no reply" in message for message in errors(caplog))


@pytest.mark.parametrize("stage", list(NOREPLY_OF_STAGE))
async def test_noreply_faked_as_continue_when_not_offered(
    open_milter: OpenMilter, stage: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The milter asks for NOREPLY_<stage>, the MTA does not offer any NOREPLY_*.
    offer = ProtocolOpts(int(POSTFIX_OPTS) & ~int(NOREPLY_OPTS))
    milter = milter_for(stage, lambda: Status.NOREPLY, opts=NOREPLY_OF_STAGE[stage])
    async with open_milter(milter, opts=offer) as client:
        assert not client.negotiated_opts & NOREPLY_OPTS
        assert await step(client, stage) == StepReply(Status.CONTINUE)
    assert errors(caplog) == []


@pytest.mark.parametrize("stage", ["connect", "helo", "mail", "body", "eom", "unknown"])
async def test_noreply_without_noreply_step_is_tempfail(
    open_milter: OpenMilter, stage: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_milter(milter_for(stage, lambda: Status.NOREPLY)) as client:
        assert parts(await step(client, stage)) == (Status.TEMPFAIL, None, True)
    assert any("NOREPLY is not a valid status" in message for message in errors(caplog))


# --- Result handlers: Ok and Err -----------------------------------------------------------


@on_rcpt
async def rcpt_result(ctx: Context[None], args: list[str]) -> Result[Status]:
    if args[0] == "<err@example.net>":
        return Err("no such mailbox database")
    return Ok(Status.CONTINUE)


async def test_ok_and_err_in_a_result_handler(
    open_milter: OpenMilter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "triomilter")
    async with open_milter(Milter("result", handlers=[rcpt_result])) as client:
        await client.mail("<a@b>")
        assert await client.rcpt("<err@example.net>") == StepReply(Status.TEMPFAIL)
        assert await client.rcpt("<ok@example.net>") == StepReply(Status.CONTINUE)
        assert (await client.eom()).status is Status.CONTINUE
    assert any("no such mailbox database" in r.getMessage() for r in caplog.records)
