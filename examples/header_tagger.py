"""A header tagger: adds ``X-Triomilter-Tagged`` with the client's name and address.

Run it:   triomilter serve examples/header_tagger.py --socket inet:8894@127.0.0.1
Try it:   triomilter check examples/header_tagger.py examples/mail/plain.eml
Postfix:  smtpd_milters = inet:127.0.0.1:8894

The client's host name comes from reverse DNS, which anyone controls: it is
taken as bytes and made printable before it goes into a header, so no name
(not UTF-8, or with a CR in it) can make the milter fail.
"""

from __future__ import annotations

import attrs

from triomilter import Actions, Context, Milter, Ok, Result, SocketInfo, Status, on_connect, on_eom


@attrs.define
class Client:
    """What we remember about the SMTP client for the messages of its connection."""

    hostname: str = "unknown"
    address: str = "unknown"


def printable(text: str | bytes) -> str:
    """``text`` as one printable line: control characters (CR, LF, NUL...) become spaces."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return "".join(char if char.isprintable() else " " for char in text).strip() or "?"


@on_connect
async def connect(ctx: Context[Client], hostname: bytes, address: SocketInfo | None) -> None:
    # -> None: this stage never answers (NOREPLY is negotiated when the MTA offers it).
    client = ctx.connection_data
    client.hostname = printable(hostname)
    if address is not None:
        client.address = printable(address.address)


@on_eom
async def eom(ctx: Context[Client]) -> Result[Status]:
    # Result: a failure of the context API is TEMPFAIL for this message, never a panic.
    client = ctx.connection_data
    await ctx.api.add_header("X-Triomilter-Tagged", f"{client.hostname} [{client.address}]")
    return Ok(Status.CONTINUE)


milter = Milter(
    "header-tagger",
    handlers=[connect, eom],
    actions=Actions.ADD_HEADER,
    connection_data=Client,
)
