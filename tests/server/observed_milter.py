"""A milter for the observability tests: it accepts, rejects and times out on cue."""

from __future__ import annotations

import trio

from triomilter import Actions, Context, Milter, Status, on_eom, on_mail, on_rcpt


@on_mail
async def mail(ctx: Context[None], args: list[str]) -> Status:
    if args[0] == "<spammer@example.org>":
        return Status.REJECT
    if args[0] == "<slow@example.org>":
        await trio.sleep(60)  # past --handler-timeout
    return Status.CONTINUE


@on_rcpt
async def rcpt(ctx: Context[None], args: list[str]) -> Status:
    return Status.CONTINUE


@on_eom
async def eom(ctx: Context[None]) -> Status:
    await ctx.api.add_header("X-Observed", "yes")
    return Status.CONTINUE


milter = Milter("observed", handlers=[mail, rcpt, eom], actions=Actions.ADD_HEADER)
