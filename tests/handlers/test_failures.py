"""Failure semantics (SPEC §2.1): Err, raised MilterError, and panics.

- ``Err`` answers TEMPFAIL and the milter goes on;
- a `MilterError` raised in a ``Result`` handler is ``Err`` (Rust's ``?``);
- a `MilterError` raised in a ``Status`` handler, and any other exception
  anywhere, is a panic: TEMPFAIL for that command, then no handler runs and
  every owed reply is TEMPFAIL; leaving the session raises `MilterPanic`
  from the original exception.
"""

from __future__ import annotations

import logging

import pytest

from triomilter import (
    Actions,
    Context,
    Err,
    MilterError,
    MilterPanic,
    Ok,
    ProtocolOpts,
    Result,
    SocketInfo,
    StageError,
    Status,
    on_abort,
    on_close,
    on_connect,
    on_eom,
    on_header,
    on_helo,
    on_mail,
    on_negotiate,
    on_rcpt,
)
from triomilter import Milter as M
from triomilter.testing import MilterClosed, StepReply, open_in_memory

from ._support import OpenMilter


class Calls(list[str]):
    """Which handlers ran, in order."""


def panicky(calls: Calls, error: BaseException) -> M:
    """Raises ``error`` at HELO "boom"; records every other call."""

    @on_connect
    async def connect(ctx: Context[None], hostname: str, address: SocketInfo | None) -> Status:
        calls.append("connect")
        return Status.CONTINUE

    @on_helo
    def helo(ctx: Context[None], hostname: str) -> Status:
        calls.append(f"helo {hostname}")
        if hostname == "boom":
            raise error
        return Status.CONTINUE

    @on_mail
    async def mail(ctx: Context[None], args: list[str]) -> Status:
        calls.append("mail")
        return Status.CONTINUE

    @on_rcpt
    async def rcpt(ctx: Context[None], args: list[str]) -> Result[Status]:
        calls.append("rcpt")
        return Ok(Status.CONTINUE)

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

    return M("panicky", handlers=[connect, helo, mail, rcpt, eom, abort, close])


# --- Err and MilterError in Result handlers --------------------------------------------------


@on_mail
async def mail_err(ctx: Context[None], args: list[str]) -> Result[Status]:
    if args[0] == "<err@x>":
        return Err(MilterError("directory unavailable"))
    if args[0] == "<raise@x>":
        raise StageError("as if a context call failed")
    return Ok(Status.CONTINUE)


@on_eom
async def eom_question_mark(ctx: Context[None]) -> Result[Status]:
    # Not negotiated: raises ActionNotNegotiated, which the Result annotation turns into Err.
    await ctx.api.quarantine("x")
    return Ok(Status.CONTINUE)


async def test_err_is_tempfail_and_the_milter_goes_on(
    open_milter: OpenMilter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "triomilter")
    async with open_milter(M("err", handlers=[mail_err])) as client:
        assert await client.mail("<err@x>") == StepReply(Status.TEMPFAIL)
        assert await client.mail("<ok@x>") == StepReply(Status.CONTINUE)
        await client.abort()
        assert await client.mail("<err@x>") == StepReply(Status.TEMPFAIL)
    assert sum("directory unavailable" in r.getMessage() for r in caplog.records) == 2


async def test_milter_error_raised_in_a_result_handler_is_err(open_milter: OpenMilter) -> None:
    # No MilterPanic on leaving: a raised MilterError is Rust's "?".
    async with open_milter(M("err", handlers=[mail_err, eom_question_mark])) as client:
        assert await client.mail("<raise@x>") == StepReply(Status.TEMPFAIL)
        assert await client.mail("<ok@x>") == StepReply(Status.CONTINUE)
        result = await client.eom()
        assert (result.status, result.modifications) == (Status.TEMPFAIL, [])
        assert (await client.send_message("<ok@x>", "<y@z>")).status is Status.TEMPFAIL


# --- panics ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [MilterError("raised in a Status handler"), ZeroDivisionError("division"), KeyError("k")],
    ids=["milter-error", "zero-division", "key-error"],
)
async def test_a_panic_answers_tempfail_and_raises_milter_panic(
    open_milter: OpenMilter, error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    calls = Calls()
    with pytest.raises(MilterPanic) as info:
        async with open_milter(panicky(calls, error)) as client:
            assert (await client.connect("mx", None)).status is Status.CONTINUE
            assert await client.helo("boom") == StepReply(Status.TEMPFAIL)
    assert info.value.__cause__ is error
    assert calls == ["connect", "helo boom"]  # on_close does not run after a panic
    assert any(
        r.levelno == logging.CRITICAL and "panicked" in r.getMessage() for r in caplog.records
    )


async def test_after_a_panic_every_reply_is_tempfail_and_no_handler_runs() -> None:
    calls = Calls()
    error = RuntimeError("boom")
    with pytest.raises(MilterPanic) as info:
        async with open_in_memory(panicky(calls, error)) as client:
            await client.connect("mx", None)
            assert await client.helo("fine") == StepReply(Status.CONTINUE)
            assert await client.helo("boom") == StepReply(Status.TEMPFAIL)
            # HELO TEMPFAIL is a connection-level decision: an MTA would stop
            # here. Start a new SMTP connection on the same milter connection.
            await client.quit_new_connection()
            assert await client.connect("mx2", None) == StepReply(Status.TEMPFAIL)
    assert info.value.__cause__ is error
    assert calls == ["connect", "helo fine", "helo boom"]


@on_rcpt
async def rcpt_boom(ctx: Context[None], args: list[str]) -> Result[Status]:
    if args[0] == "<boom@x>":
        raise ValueError("not a MilterError: a panic even in a Result handler")
    return Ok(Status.CONTINUE)


@on_header
async def header_counting(ctx: Context[list[str]], name: str, value: str) -> Status:
    raise AssertionError("no handler may run after a panic")


@on_abort
async def abort_after(ctx: Context[None]) -> None:
    raise AssertionError("on_abort does not run after a panic")


async def test_any_other_exception_in_a_result_handler_is_a_panic() -> None:
    milter = M("boom", handlers=[rcpt_boom, header_counting, abort_after])
    with pytest.raises(MilterPanic) as info:
        async with open_in_memory(milter) as client:
            await client.mail("<a@b>")
            assert await client.rcpt("<boom@x>") == StepReply(Status.TEMPFAIL)
            # Every reply owed from now on is TEMPFAIL, no handler runs.
            assert await client.rcpt("<fine@x>") == StepReply(Status.TEMPFAIL)
            assert await client.header("Subject", "x") == StepReply(Status.TEMPFAIL)
            # The message is decided: an MTA aborts and starts the next one.
            await client.abort()
            assert (await client.send_message("<a@b>", "<c@d>")).status is Status.TEMPFAIL
            assert (await client.unknown("NOOP")).status is Status.CONTINUE  # no U: not sent
    assert isinstance(info.value.__cause__, ValueError)


async def test_after_a_panic_noreply_stages_stay_silent() -> None:
    @on_helo
    async def helo(ctx: Context[None], hostname: str) -> Status:
        raise RuntimeError("boom")

    @on_header
    async def header(ctx: Context[None], name: str, value: str) -> Status:
        raise AssertionError("not called after the panic")

    milter = M("quiet", handlers=[helo, header], protocol_opts=ProtocolOpts.NOREPLY_HEADER)
    with pytest.raises(MilterPanic):
        async with open_in_memory(milter) as client:
            assert await client.helo("x") == StepReply(Status.TEMPFAIL)
            await client.quit_new_connection()
            await client.mail("<a@b>")
            # A NOREPLY stage gets no reply, panic or not: the stream stays in sync.
            assert await client.header("Subject", "x") == StepReply(Status.NOREPLY)
            assert (await client.eom()).status is Status.TEMPFAIL


@pytest.mark.parametrize("stage", ["abort", "close"])
async def test_a_panic_in_abort_or_close_still_counts(open_milter: OpenMilter, stage: str) -> None:
    error = RuntimeError(stage)

    @on_abort
    async def abort(ctx: Context[None]) -> None:
        raise error

    @on_close
    def close(ctx: Context[None]) -> None:
        raise error

    @on_mail
    async def mail(ctx: Context[None], args: list[str]) -> Status:
        return Status.CONTINUE

    handler = abort if stage == "abort" else close
    with pytest.raises(MilterPanic) as info:
        async with open_milter(M("ignored", handlers=[mail, handler])) as client:
            assert (await client.mail("<a@b>")).status is Status.CONTINUE
            await client.abort()
    assert info.value.__cause__ is error


async def test_a_panic_in_negotiate_closes_the_connection(open_milter: OpenMilter) -> None:
    error = RuntimeError("negotiate")

    @on_negotiate
    async def negotiate(
        ctx: Context[None], actions: Actions, opts: ProtocolOpts
    ) -> tuple[Status, Actions, ProtocolOpts]:
        raise error

    with pytest.raises(MilterPanic) as info:
        async with open_milter(M("neg", handlers=[negotiate])):
            pass  # pragma: no cover
    assert info.value.__cause__ is error
    assert any("MilterClosed" in note for note in info.value.__notes__)


async def test_err_from_negotiate_closes_the_connection_without_panic(
    open_milter: OpenMilter,
) -> None:
    @on_negotiate
    async def negotiate(
        ctx: Context[None], actions: Actions, opts: ProtocolOpts
    ) -> Result[tuple[Status, Actions, ProtocolOpts]]:
        return Err("not today")

    with pytest.raises(MilterClosed):
        async with open_milter(M("neg", handlers=[negotiate])):
            pass  # pragma: no cover


async def test_a_failing_handler_of_an_unanswered_stage_says_nothing_more(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No reply is owed: one error line, no "handler returned TEMPFAIL ... nothing sent"."""

    @on_header
    async def header(ctx: Context[None], name: str, value: str) -> None:
        raise ValueError("a bug")

    milter = M("quiet", handlers=[header], on_exception="tempfail")
    async with open_in_memory(milter) as client:
        await client.mail("<a@b>")
        assert (await client.header("Subject", "x")).status is Status.NOREPLY
        assert (await client.eom()).status is Status.TEMPFAIL  # what it could not refuse
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(messages) == 1 and "raised ValueError" in messages[0], messages
    assert "TEMPFAIL at the next reply" in messages[0]


def test_an_unknown_exception_policy_is_refused_when_the_milter_is_made() -> None:
    with pytest.raises(ValueError, match="on_exception"):
        M("typo", handlers=[], on_exception="ignore")  # type: ignore[arg-type]
