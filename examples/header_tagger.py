"""A header tagger: adds ``X-Triomilter-Tagged`` with the client's address to every message.

Run it:   triomilter serve examples/header_tagger.py --socket inet:8894@127.0.0.1
Postfix:  smtpd_milters = inet:127.0.0.1:8894
"""

from __future__ import annotations

import attrs

from triomilter import Actions, Context, Milter, SocketInfo, Status, on_connect, on_eom


@attrs.define
class Client:
    """What we remember about the SMTP client for the messages of its connection."""

    hostname: str
    address: str


@on_connect
async def connect(ctx: Context[Client], hostname: str, address: SocketInfo | None) -> Status:
    ctx.data = Client(hostname, address.address if address else "unknown")
    return Status.CONTINUE


@on_eom
async def eom(ctx: Context[Client]) -> Status:
    client = ctx.data
    tag = f"{client.hostname} [{client.address}]" if client else "unknown client"
    await ctx.api.add_header("X-Triomilter-Tagged", tag)
    return Status.CONTINUE


milter = Milter("header-tagger", handlers=[connect, eom], actions=Actions.ADD_HEADER)
