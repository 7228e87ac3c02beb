"""A milter that breaks the protocol, hangs or hangs up: clear errors, never a hang."""

from __future__ import annotations

import struct

import pytest
import trio

from triomilter import Status
from triomilter.protocol import (
    CONTINUE,
    PROGRESS,
    Actions,
    AddHeader,
    Command,
    EndOfMessage,
    Header,
    LocalProtocolError,
    MilterConnection,
    ProtocolOpts,
    RemoteProtocolError,
    ReplaceBody,
)
from triomilter.testing import MilterClosed, MilterTimeout, StepReply

from ._responder import HANG, HANG_UP, Answer, Responder, raw, session

H_PACKET = raw("h", b"X-A\0b\0")


def answering(**by_code: Answer) -> Responder:
    def script(command: Command, conn: MilterConnection) -> Answer | None:
        return by_code.get(chr(command.code))

    return Responder(script=script)


async def test_a_change_outside_end_of_message() -> None:
    async with session(answering(H=[H_PACKET])) as client:
        await client.connect("mx", None)
        with pytest.raises(RemoteProtocolError, match=r"ADDHEADER \('h'\) is not a valid reply"):
            await client.helo("mx")
        # The session is over; the client says why, and leaving the block is quiet.
        with pytest.raises(LocalProtocolError, match="ended with an error"):
            await client.mail("<a@b>")


async def test_a_reply_when_none_was_due() -> None:
    def script(command: Command, conn: MilterConnection) -> Answer | None:
        return [raw("c")] if isinstance(command, Header) else None

    responder = Responder(opts=ProtocolOpts.NOREPLY_HEADER, script=script)
    async with session(responder) as client:
        await client.connect("mx", None)
        await client.mail("<a@b>")
        assert await client.header("Subject", "x") == StepReply(Status.NOREPLY)
        with pytest.raises(RemoteProtocolError, match="unsolicited CONTINUE"):
            await client.eoh()


async def test_two_replies_to_one_command() -> None:
    async with session(answering(C=[raw("c"), raw("c")])) as client:
        with pytest.raises(RemoteProtocolError, match="unsolicited"):
            await client.connect("mx", None)


async def test_a_reply_to_abort() -> None:
    async with session(answering(A=[raw("c")])) as client:
        await client.connect("mx", None)
        await client.mail("<a@b>")
        await client.abort()
        with pytest.raises(RemoteProtocolError, match="unsolicited"):
            await client.mail("<a@b>")


async def test_a_stray_reply_before_quit() -> None:
    async with session(answering(A=[raw("c")])) as client:
        await client.connect("mx", None)
        await client.mail("<a@b>")
        await client.abort()
        with pytest.raises(RemoteProtocolError, match="unsolicited"):
            await client.close()


async def test_a_reply_to_quit() -> None:
    with pytest.raises(RemoteProtocolError, match="unsolicited CONTINUE"):
        async with session(answering(Q=[raw("c")])) as client:
            await client.connect("mx", None)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (raw("Z"), r"unknown reply b'Z' is not a reply"),
        (raw("s"), r"SKIP \('s'\) is not a valid reply to MAIL"),
        (raw("y", b"250 ok\0"), "not a 4xx/5xx reply"),
        (raw("c", b"junk"), "malformed|expected no data"),
        (raw("y", b"550 no NUL"), "NUL-terminated"),
        (struct.pack(">I", 0), "length 0"),
        (struct.pack(">I", 100_000) + b"c", "exceeds the limit"),
    ],
)
async def test_bad_replies(answer: bytes, message: str) -> None:
    async with session(answering(M=[answer])) as client:
        await client.connect("mx", None)
        with pytest.raises(RemoteProtocolError, match=message):
            await client.mail("<a@b>")


async def test_skip_that_was_not_negotiated() -> None:
    async with session(answering(B=[raw("s")])) as client:
        await client.connect("mx", None)
        await client.mail("<a@b>")
        with pytest.raises(RemoteProtocolError, match="SKIP was not negotiated"):
            await client.body(b"x")


async def test_a_change_that_was_not_negotiated() -> None:
    def script(command: Command, conn: MilterConnection) -> Answer | None:
        return [raw("q", b"why\0"), CONTINUE] if isinstance(command, EndOfMessage) else None

    async with session(Responder(actions=Actions.ADD_HEADER, script=script)) as client:
        await client.connect("mx", None)
        await client.mail("<a@b>")
        with pytest.raises(RemoteProtocolError, match=r"needs the .*QUARANTINE.* action"):
            await client.eom()


async def test_body_replacement_must_be_contiguous() -> None:
    def script(command: Command, conn: MilterConnection) -> Answer | None:
        if isinstance(command, EndOfMessage):
            return [ReplaceBody(b"a"), AddHeader(b"X", b"y"), raw("b", b"c"), CONTINUE]
        return None

    async with session(Responder(script=script)) as client:
        await client.connect("mx", None)
        await client.mail("<a@b>")
        with pytest.raises(RemoteProtocolError, match="contiguous"):
            await client.eom()


async def test_negotiation_reply_that_does_not_fit_the_offer() -> None:
    reply = raw("O", struct.pack(">III", 6, 0x1FF, 0))
    with pytest.raises(RemoteProtocolError, match="actions not offered"):
        async with session(Responder(negotiation=reply), actions=Actions.ADD_HEADER):
            pass  # pragma: no cover


async def test_hanging_up_while_a_reply_is_due() -> None:
    async with session(answering(H=[HANG_UP])) as client:
        await client.connect("mx", None)
        with pytest.raises(MilterClosed, match=r"reply to HELO \('H'\) was still pending"):
            await client.helo("mx")


async def test_hanging_up_between_steps() -> None:
    async with session(answering(A=[HANG_UP])) as client:
        await client.connect("mx", None)
        await client.mail("<a@b>")
        await client.abort()
        with pytest.raises(MilterClosed, match="closed the connection"):
            await client.mail("<a@b>")
        with pytest.raises(LocalProtocolError, match="ended with an error"):
            await client.helo("mx")


async def test_a_step_times_out(autojump_clock: trio.abc.Clock) -> None:
    async with session(answering(H=[HANG]), timeout=3) as client:
        await client.connect("mx", None)
        start = trio.current_time()
        with pytest.raises(MilterTimeout, match=r"no reply from the milter to HELO .* within 3 s"):
            await client.helo("mx")
        assert trio.current_time() - start == pytest.approx(3)


async def test_negotiation_times_out(autojump_clock: trio.abc.Clock) -> None:
    with pytest.raises(MilterTimeout, match="OPTNEG"):
        async with session(Responder(negotiation=b""), timeout=2):
            pass  # pragma: no cover


async def test_progress_restarts_the_timeout(autojump_clock: trio.abc.Clock) -> None:
    slow: Answer = [PROGRESS, 1.5, PROGRESS, 1.5, PROGRESS, 1.5, CONTINUE]
    responder = answering(E=slow)
    async with session(responder, timeout=2) as client:
        await client.connect("mx", None)
        await client.mail("<a@b>")
        result = await client.eom()
        assert (result.status, result.progress) == (Status.CONTINUE, 3)
        responder.script = answering(E=[1.0, PROGRESS, 2.5, CONTINUE]).script
        await client.mail("<a@b>")
        with pytest.raises(MilterTimeout):
            await client.eom()


async def test_a_milter_that_stays_after_quit(autojump_clock: trio.abc.Clock) -> None:
    responder = Responder(closed_after_quit=False)
    with pytest.raises(MilterTimeout, match="did not close the connection after QUIT"):
        async with session(responder, timeout=1) as client:
            await client.connect("mx", None)


async def test_the_test_exception_comes_out_unwrapped() -> None:
    with pytest.raises(KeyError):
        async with session(Responder()) as client:
            await client.connect("mx", None)
            raise KeyError("from the test")


async def test_invalid_timeout() -> None:
    with pytest.raises(ValueError, match="timeout"):
        async with session(Responder(), timeout=0):
            pass  # pragma: no cover


async def test_every_misbehaviour_is_one_remote_protocol_error(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A flaky milter needs one ``except``: a timeout is a protocol error too."""
    assert issubclass(MilterTimeout, TimeoutError)  # and still what it always was
    assert issubclass(MilterClosed, RemoteProtocolError)
    async with session(answering(H=[HANG]), timeout=3) as client:
        await client.connect("mx", None)
        with pytest.raises(RemoteProtocolError, match="no reply from the milter to HELO"):
            await client.helo("mx")
