"""Milters for the server and CLI tests (imported in process and by ``triomilter serve``).

``milter`` handles every stage (so the MTA sends them all), tags every
message with the serving process id (``X-Pid``) and the client's host name
(``X-Client``), so a test can tell which ``--workers`` process answered, and
panics on ``HELO panic`` (``RuntimeError("boom")``) so a test can crash a
worker. ``blocker`` blocks its whole event loop on ``HELO block:PATH`` (as
a synchronous DNS lookup would) until the file PATH exists.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from triomilter import (
    Actions,
    Context,
    Milter,
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
)


@on_connect
async def connect(ctx: Context[str], hostname: str, address: SocketInfo | None) -> Status:
    ctx.data = hostname
    return Status.CONTINUE


@on_helo
async def helo(ctx: Context[str], hostname: str) -> Status:
    if hostname == "panic":
        raise RuntimeError("boom")
    return Status.CONTINUE


@on_mail
async def mail(ctx: Context[str], args: list[str]) -> Status:
    return Status.CONTINUE


@on_rcpt
async def rcpt(ctx: Context[str], args: list[str]) -> Status:
    return Status.CONTINUE


@on_data
async def data(ctx: Context[str]) -> Status:
    return Status.CONTINUE


@on_header
async def header(ctx: Context[str], name: str, value: str) -> Status:
    return Status.CONTINUE


@on_eoh
async def eoh(ctx: Context[str]) -> Status:
    return Status.CONTINUE


@on_body
async def body(ctx: Context[str], chunk: bytes) -> Status:
    return Status.CONTINUE


@on_eom
async def eom(ctx: Context[str]) -> Status:
    await ctx.api.add_header("X-Pid", str(os.getpid()))
    await ctx.api.add_header("X-Client", ctx.data or "?")
    return Status.CONTINUE


milter = Milter(
    "pid-tagger",
    handlers=[connect, helo, mail, rcpt, data, header, eoh, body, eom],
    actions=Actions.ADD_HEADER,
)


@on_helo
def helo_blocking(ctx: Context[None], hostname: str) -> Status:
    """``block:PATH``: hold the event loop until PATH exists (at most a minute)."""
    if hostname.startswith("block:"):
        release = Path(hostname.removeprefix("block:"))
        Path(f"{release}.blocked").touch()
        deadline = time.monotonic() + 60
        while not release.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    return Status.CONTINUE


blocker = Milter("blocker", handlers=[helo_blocking])
