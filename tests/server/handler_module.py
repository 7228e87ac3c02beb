"""A "typed handler module": decorated handlers and settings, no `Milter` object."""

from __future__ import annotations

from triomilter import Actions, Context, Status, on_eom

MILTER_NAME = "typed-handlers"
ACTIONS = Actions.ADD_HEADER


@on_eom
async def eom(ctx: Context[None]) -> Status:
    await ctx.api.add_header("X-Typed", "yes")
    return Status.CONTINUE
