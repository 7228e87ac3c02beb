"""Milters run by the end-to-end tests through the command line
(``python -m triomilter serve tests/e2e/cli_milters.py:NAME``), where the
process itself is under test: its exit status after a panic, its shutdown on
SIGTERM.  Not a test module (no ``test_`` prefix).

``gated`` and ``panicky`` synchronise with the test through files in the
directory named by ``TRIOMILTER_E2E_GATE``: a message whose Subject contains
"hold" writes ``held-N`` when its body arrives, then waits (at most 30 s) for
``release``.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import trio

from triomilter import (
    Actions,
    Context,
    Milter,
    Status,
    on_body,
    on_eoh,
    on_eom,
    on_header,
    on_mail,
)

GATE_ENV = "TRIOMILTER_E2E_GATE"
_held = itertools.count(1)


@on_mail
async def mail(ctx: Context[str], args: list[str]) -> Status:
    ctx.data = ""
    return Status.CONTINUE


@on_header
async def header(ctx: Context[str], name: str, value: str) -> Status:
    if name.lower() == "subject":
        ctx.data = value
    return Status.CONTINUE


@on_eoh
async def refusing_eoh(ctx: Context[str]) -> Status:
    if ctx.data == "refuse":
        return Status.REJECT
    return Status.CONTINUE


@on_body
async def gated_body(ctx: Context[str], chunk: bytes) -> Status:
    if ctx.data and "hold" in ctx.data:
        gate = Path(os.environ[GATE_ENV])
        (gate / f"held-{next(_held)}").write_text(ctx.data)
        with trio.move_on_after(30):
            while not (gate / "release").exists():  # noqa: ASYNC110 - a file written by the test process: no event to wait on
                await trio.sleep(0.01)
    return Status.CONTINUE


@on_eom
async def tagging_eom(ctx: Context[str]) -> Status:
    await ctx.api.add_header("X-Filtered", f"subject={ctx.data}")
    return Status.CONTINUE


@on_eom
async def panicking_eom(ctx: Context[str]) -> Status:
    if ctx.data == "panic":
        raise RuntimeError("a bug in the handler")
    await ctx.api.add_header("X-Filtered", f"subject={ctx.data}")
    return Status.CONTINUE


gated = Milter(
    "gated", handlers=[mail, header, gated_body, tagging_eom], actions=Actions.ADD_HEADER
)
"""Messages whose Subject contains "hold" wait for the gate; all get X-Filtered."""

panicky = Milter(
    "panicky",
    handlers=[mail, header, refusing_eoh, gated_body, panicking_eom],
    actions=Actions.ADD_HEADER,
)
"""Like ``gated``, and: Subject "panic" makes on_eom raise (a panic);
"refuse" is rejected at end of headers."""
