"""The milter behind HAProxy in the scale-out test, run as
``python -m triomilter serve tests/e2e/backend_milter.py``; not a test module.

Every message gets ``X-Backend: NAME``, NAME taken from the environment
(``TRIOMILTER_E2E_BACKEND``), so a delivered message tells which process
filtered it.  A message whose Subject contains "hold" stops in on_body:
the milter writes ``held-NAME-N`` (containing the Subject) into the
directory ``TRIOMILTER_E2E_GATE`` and waits, at most 30 s, until the file
``release`` exists there; the test uses this to have a message in flight
inside a given backend when it kills that backend.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from pathlib import Path

import trio

from triomilter import Actions, Context, Milter, Status, on_body, on_eom, on_header, on_mail

BACKEND_ENV = "TRIOMILTER_E2E_BACKEND"
GATE_ENV = "TRIOMILTER_E2E_GATE"
HOLD_LIMIT = 30.0  # seconds; the test releases or kills long before

BACKEND = os.environ.get(BACKEND_ENV, "unnamed")
_held = itertools.count(1)


@dataclasses.dataclass
class Message:
    subject: str = ""
    held: bool = False  # on_body may run once per body chunk: hold once


@on_mail
async def mail(ctx: Context[Message], args: list[str]) -> Status:
    ctx.data = Message()
    return Status.CONTINUE


@on_header
async def header(ctx: Context[Message], name: str, value: str) -> Status:
    assert ctx.data is not None
    if name.lower() == "subject":
        ctx.data.subject = value
    return Status.CONTINUE


@on_body
async def body(ctx: Context[Message], chunk: bytes) -> Status:
    assert ctx.data is not None
    if "hold" in ctx.data.subject and not ctx.data.held:
        ctx.data.held = True
        gate = Path(os.environ[GATE_ENV])
        # Written under a temporary name, then renamed: the test never
        # reads a half-written file.
        tmp = gate / f".held-{BACKEND}-{os.getpid()}.tmp"
        tmp.write_text(ctx.data.subject)
        tmp.rename(gate / f"held-{BACKEND}-{next(_held)}")
        with trio.move_on_after(HOLD_LIMIT):
            while not (gate / "release").exists():  # noqa: ASYNC110 - a file from the test
                await trio.sleep(0.01)
    return Status.CONTINUE


@on_eom
async def eom(ctx: Context[Message]) -> Status:
    await ctx.api.add_header("X-Backend", BACKEND)
    return Status.CONTINUE


milter = Milter("backend", handlers=[mail, header, body, eom], actions=Actions.ADD_HEADER)
