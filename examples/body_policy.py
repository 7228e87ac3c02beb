"""A body and size policy working on raw bytes, using SKIP to stop reading early.

- Headers are read as ``bytes`` (8-bit headers are fine); a message whose
  ``Subject`` contains ``FORBIDDEN_SUBJECT`` is rejected at end of headers.
- The body is scanned chunk by chunk for ``FORBIDDEN_BODY``; once found, the
  milter answers SKIP (the MTA sends no more body) and rejects the message
  at end of message. A body above ``MAX_BODY`` bytes is rejected the same way.
- Every other message gets ``X-Body-Size`` and ``X-Body-SHA256`` headers.

Run it:   triomilter serve examples/body_policy.py --socket inet:8896@127.0.0.1
"""

from __future__ import annotations

import hashlib

import attrs

from triomilter import (
    Actions,
    Context,
    Milter,
    ProtocolOpts,
    Status,
    on_body,
    on_eoh,
    on_eom,
    on_header,
    on_mail,
)

FORBIDDEN_SUBJECT = b"BUY NOW"
FORBIDDEN_BODY = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR"
MAX_BODY = 10 * 1024 * 1024


@attrs.define
class Scan:
    size: int = 0
    digest: hashlib._Hash = attrs.field(factory=hashlib.sha256)
    verdict: str | None = None  # why the message will be rejected
    tail: bytes = b""  # the end of the previous chunk, for matches across chunks


@on_mail
async def mail(ctx: Context[Scan], args: list[bytes]) -> Status:
    ctx.data = Scan()
    return Status.CONTINUE


@on_header
async def header(ctx: Context[Scan], name: bytes, value: bytes) -> Status:
    if ctx.data is not None and name.lower() == b"subject" and FORBIDDEN_SUBJECT in value:
        ctx.data.verdict = "subject"
    return Status.CONTINUE


@on_eoh
async def eoh(ctx: Context[Scan]) -> Status:
    if ctx.data is not None and ctx.data.verdict == "subject":
        ctx.api.set_error_reply("550", "5.7.1", "Message refused: its subject looks like spam")
        return Status.REJECT
    return Status.CONTINUE


@on_body
async def body(ctx: Context[Scan], chunk: bytes) -> Status:
    scan = ctx.data
    if scan is None:
        return Status.CONTINUE
    scan.size += len(chunk)
    scan.digest.update(chunk)
    if FORBIDDEN_BODY in scan.tail + chunk:
        scan.verdict = "content"
    elif scan.size > MAX_BODY:
        scan.verdict = "size"
    scan.tail = chunk[-len(FORBIDDEN_BODY) :]
    # Decided: spare the MTA sending (and us reading) the rest.
    return Status.SKIP if scan.verdict else Status.CONTINUE


@on_eom
async def eom(ctx: Context[Scan]) -> Status:
    scan = ctx.data
    if scan is None:
        return Status.CONTINUE
    if scan.verdict == "content":
        ctx.api.set_error_reply("554", "5.7.1", "Message refused: forbidden content")
        return Status.REJECT
    if scan.verdict == "size":
        ctx.api.set_error_reply("552", "5.3.4", f"Message body exceeds {MAX_BODY} bytes")
        return Status.REJECT
    await ctx.api.add_header("X-Body-Size", str(scan.size))
    await ctx.api.add_header("X-Body-SHA256", scan.digest.hexdigest())
    return Status.CONTINUE


milter = Milter(
    "body-policy",
    handlers=[mail, header, eoh, body, eom],
    actions=Actions.ADD_HEADER,
    protocol_opts=ProtocolOpts.SKIP,
)
