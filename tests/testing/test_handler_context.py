"""HandlerContext: calling a decorated handler directly, without an MTA session."""

from __future__ import annotations

import pytest
import trio

from triomilter import (
    ActionNotNegotiated,
    Actions,
    Context,
    MacroStage,
    Stage,
    StageError,
    Status,
    on_eom,
    on_rcpt,
)
from triomilter.testing import AddHeader, HandlerContext, ReplaceBody


@on_eom
async def eom(ctx: Context[list[str]]) -> Status:
    await ctx.api.add_header("X-Queue", ctx.api.macro_value("i") or "?")
    await ctx.api.append_body_chunk(b"x" * 70000)
    await ctx.api.signal_progress()
    if ctx.data is not None:
        ctx.data.append("eom")
    return Status.CONTINUE


@on_rcpt
async def rcpt(ctx: Context[None], args: list[str]) -> Status:
    ctx.api.set_error_reply("550", "5.7.1", ["no", "100%"])
    return Status.REJECT


async def test_records_what_the_handler_did() -> None:
    seen: list[str] = []
    harness = HandlerContext(seen, macros={MacroStage.DATA: {"i": "4ABC"}})
    assert await eom(harness.ctx) is Status.CONTINUE
    assert seen == ["eom"]
    assert harness.modifications[0] == AddHeader("X-Queue", "4ABC")
    body = harness.modifications[1]
    assert isinstance(body, ReplaceBody) and len(body.chunks) == 2
    assert harness.progress == 1


async def test_validates_like_a_session() -> None:
    with pytest.raises(StageError):
        await eom(HandlerContext[list[str]](stage=Stage.RCPT).ctx)
    with pytest.raises(ActionNotNegotiated):
        await eom(HandlerContext[list[str]](actions=Actions.REPLACE_BODY).ctx)


async def test_error_reply() -> None:
    harness: HandlerContext[None] = HandlerContext(stage=Stage.RCPT)
    assert await rcpt(harness.ctx, ["<a@b>"]) is Status.REJECT
    assert harness.error_reply == "550-5.7.1 no\r\n550 5.7.1 100%%"


async def test_background_tasks_on_the_nursery_given() -> None:
    """``HandlerContext(nursery=...)`` backs ``ctx.connection_nursery`` (it did not, once)."""
    results: list[str] = []

    async def lookup(name: str) -> None:
        await trio.lowlevel.checkpoint()
        results.append(name)

    @on_eom
    async def eom(ctx: Context[None]) -> Status:
        ctx.connection_nursery.start_soon(lookup, "rbl")
        started = await ctx.connection_nursery.start(_started_with, "value")
        results.append(started)
        return Status.CONTINUE

    async with trio.open_nursery() as nursery:
        assert await eom(HandlerContext(nursery=nursery).ctx) is Status.CONTINUE
    assert sorted(results) == ["rbl", "value"]


async def _started_with(
    value: str, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    task_status.started(value)


async def test_a_failing_background_task_fails_the_test() -> None:
    async def failing() -> None:
        raise RuntimeError("lookup broke")

    harness = HandlerContext(nursery=None)
    with pytest.raises(StageError, match="not available outside a connection"):
        harness.ctx.connection_nursery.start_soon(failing)
    with pytest.RaisesGroup(pytest.RaisesExc(RuntimeError, match="lookup broke")):
        async with trio.open_nursery() as nursery:
            HandlerContext(nursery=nursery).ctx.connection_nursery.start_soon(failing)
