"""A milter whose end-of-message handler has a bug (a panic): `check` exits 5."""

from __future__ import annotations

from triomilter import Context, Milter, Status, on_eom


@on_eom
async def eom(ctx: Context[None]) -> Status:
    raise KeyError("a bug in the handler")


milter = Milter("panicking", handlers=[eom])
