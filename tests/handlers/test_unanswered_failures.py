"""A handler of a stage that answers nothing fails: the mail is not let through.

A ``-> None`` handler (``NOREPLY_*`` negotiated) cannot refuse anything, so
when it fails (an exception with ``on_exception="tempfail"``, ``Err``, an
argument that is not UTF-8, its deadline) the failure is remembered and the
next reply owed is TEMPFAIL instead of a "go on": at the latest the end of
message, so a message whose filter failed half-way is never accepted
unfiltered. A failure at connect or HELO spoils every message of that
SMTP connection; one inside a message only that message.
"""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from triomilter import (
    Context,
    Err,
    Milter,
    ProtocolOpts,
    Result,
    ServerOptions,
    SocketInfo,
    Status,
    on_abort,
    on_body,
    on_connect,
    on_eom,
    on_header,
    on_mail,
    on_rcpt,
)
from triomilter.testing import POSTFIX_OPTS, open_in_memory


@on_header
async def failing_header(ctx: Context[None], name: str, value: bytes) -> None:
    if name == "X-Bug":
        raise ValueError("a bug")


def tempfailing(*handlers: object) -> Milter[None, None]:
    return Milter("t", handlers=list(handlers), on_exception="tempfail")  # type: ignore[arg-type]


async def test_a_failed_header_handler_tempfails_the_message_not_the_next() -> None:
    async with open_in_memory(tempfailing(failing_header)) as client:
        await client.mail("<a@b>")
        await client.rcpt("<c@d>")
        assert (await client.header("X-Bug", "1")).status is Status.NOREPLY
        assert (await client.header("Subject", "x")).status is Status.NOREPLY
        assert (await client.eom()).status is Status.TEMPFAIL
        # The next message on the same connection is judged on its own.
        await client.mail("<a@b>")
        await client.header("Subject", "y")
        assert (await client.eom()).status is Status.CONTINUE


async def test_a_refusal_is_kept_after_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    @on_eom
    async def eom(ctx: Context[None]) -> Status:
        return Status.REJECT

    async with open_in_memory(tempfailing(failing_header, eom)) as client:
        await client.mail("<a@b>")
        await client.header("X-Bug", "1")
        assert (await client.eom()).status is Status.REJECT
    assert not [r for r in caplog.records if "instead of" in r.getMessage()]


async def test_the_tempfail_is_logged_with_the_failed_stage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with open_in_memory(tempfailing(failing_header)) as client:
        await client.mail("<a@b>")
        await client.header("X-Bug", "1")
        await client.eom()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [
        "[test] eom: answering TEMPFAIL instead of CONTINUE: handler for header failed "
        "and that stage answers nothing"
    ]


async def test_an_aborted_message_takes_its_failure_with_it() -> None:
    async with open_in_memory(tempfailing(failing_header)) as client:
        await client.mail("<a@b>")
        await client.header("X-Bug", "1")
        await client.abort()
        await client.mail("<a@b>")
        assert (await client.eom()).status is Status.CONTINUE


async def test_a_failed_mail_handler_tempfails_every_recipient() -> None:
    @on_mail
    async def mail(ctx: Context[None], args: list[str]) -> None:
        raise OSError("lookup failed")

    @on_rcpt
    async def rcpt(ctx: Context[None], args: list[str]) -> Status:
        return Status.CONTINUE

    async with open_in_memory(tempfailing(mail, rcpt)) as client:
        assert (await client.mail("<a@b>")).status is Status.NOREPLY
        assert (await client.rcpt("<c@d>")).status is Status.TEMPFAIL
        assert (await client.rcpt("<e@f>")).status is Status.TEMPFAIL
        await client.abort()  # no recipient left: the MTA gives the message up
        await client.mail("<a@b>")  # fails again: a new message, a new failure
        assert (await client.rcpt("<c@d>")).status is Status.TEMPFAIL


async def test_a_failed_connect_handler_tempfails_every_message_of_the_connection() -> None:
    calls = 0

    @on_connect
    async def connect(ctx: Context[None], hostname: str, address: SocketInfo | None) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("no DNS")

    async with open_in_memory(tempfailing(connect)) as client:
        await client.connect("mx.example", None)
        for _ in range(2):
            await client.mail("<a@b>")  # not even sent: no handler, NO_MAIL negotiated
            assert (await client.eom()).status is Status.TEMPFAIL
        # The MTA reuses the milter connection for a new SMTP connection.
        await client.quit_new_connection()
        await client.connect("mx.example", None)
        await client.mail("<a@b>")
        assert (await client.eom()).status is Status.CONTINUE


async def test_an_argument_that_is_not_utf8_tempfails_the_message() -> None:
    @on_header
    async def header(ctx: Context[None], name: str, value: str) -> None:
        pass  # pragma: no cover (not called: the value is not UTF-8)

    async with open_in_memory(tempfailing(header)) as client:
        await client.mail("<a@b>")
        assert (await client.header("Subject", b"caf\xe9")).status is Status.NOREPLY
        assert (await client.eom()).status is Status.TEMPFAIL


async def test_err_from_a_silent_status_handler_tempfails_the_message() -> None:
    # The older way to an unanswered stage: NOREPLY_BODY asked for, Result returned.
    @on_body
    async def body(ctx: Context[None], chunk: bytes) -> Result[Status]:
        return Err("spool full")

    milter = Milter(
        "t", handlers=[body], protocol_opts=ProtocolOpts.NOREPLY_BODY, on_exception="tempfail"
    )
    async with open_in_memory(milter) as client:
        await client.mail("<a@b>")
        assert (await client.body(b"x")).status is Status.NOREPLY
        assert (await client.eom()).status is Status.TEMPFAIL


async def test_a_refusal_nobody_could_hear_tempfails_the_message() -> None:
    @on_header
    async def header(ctx: Context[None], name: str, value: str) -> Status:
        return Status.REJECT if name == "X-Spam" else Status.NOREPLY

    milter = Milter("t", handlers=[header], protocol_opts=ProtocolOpts.NOREPLY_HEADER)
    async with open_in_memory(milter) as client:
        await client.mail("<a@b>")
        await client.header("X-Spam", "yes")
        assert (await client.eom()).status is Status.TEMPFAIL


async def test_a_silent_handler_past_its_deadline_tempfails_the_message(
    autojump_clock: trio.testing.MockClock,
) -> None:
    @on_body
    async def body(ctx: Context[None], chunk: bytes) -> None:
        await trio.sleep(60)

    options = ServerOptions(handler_timeout=1)
    async with open_in_memory(tempfailing(body), options=options) as client:
        await client.mail("<a@b>")
        await client.body(b"x")
        assert (await client.eom()).status is Status.TEMPFAIL


async def test_a_failing_abort_handler_spoils_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    @on_abort
    async def abort(ctx: Context[None]) -> None:
        await trio.sleep(60)

    options = ServerOptions(handler_timeout=1)
    async with open_in_memory(tempfailing(abort), options=options) as client:
        await client.mail("<a@b>")
        await client.abort()
        await client.mail("<a@b>")
        assert (await client.eom()).status is Status.CONTINUE


async def test_without_noreply_offered_the_failing_stage_itself_answers_tempfail() -> None:
    no_noreply = POSTFIX_OPTS & ~ProtocolOpts.NOREPLY_HEADER
    async with open_in_memory(tempfailing(failing_header), opts=no_noreply) as client:
        await client.mail("<a@b>")
        assert (await client.header("X-Bug", "1")).status is Status.TEMPFAIL
        await client.mail("<a@b>")  # that message is over; the next is judged on its own
        await client.header("Subject", "x")
        assert (await client.eom()).status is Status.CONTINUE
