"""A milter making every kind of end-of-message change, for modifier.lua
(run as ``triomilter serve tests/miltertest/modifier.py``).

The Subject decides: "reject" gets a custom 550 at end of message,
"quarantine" is quarantined; anything else gets all the other changes.
"""

from __future__ import annotations

from triomilter import Actions, Context, Milter, Status, on_eom, on_header, on_mail, on_rcpt


@on_mail
async def mail(ctx: Context[str], args: list[str]) -> Status:
    ctx.data = ""
    return Status.CONTINUE


@on_rcpt
async def rcpt(ctx: Context[str], args: list[str]) -> Status:
    return Status.CONTINUE


@on_header
async def header(ctx: Context[str], name: str, value: str) -> Status:
    if name.lower() == "subject":
        ctx.data = value
    return Status.CONTINUE


@on_eom
async def eom(ctx: Context[str]) -> Status:
    subject = ctx.data or ""
    if subject == "reject":
        ctx.api.set_error_reply("550", "5.7.1", "Not this one")
        return Status.REJECT
    if subject == "quarantine":
        await ctx.api.quarantine("looks suspicious")
        return Status.CONTINUE
    await ctx.api.add_header("X-Added", "added value")
    await ctx.api.insert_header(0, "X-Inserted", "at the top")
    await ctx.api.replace_header("Subject", 1, f"[tagged] {subject}")
    await ctx.api.replace_header("X-Remove", 1, None)
    await ctx.api.add_recipient("<added@example.test>")
    await ctx.api.remove_recipient("<removed@example.test>")
    await ctx.api.append_body_chunk(b"the new body\r\n")
    return Status.CONTINUE


milter = Milter(
    "modifier",
    handlers=[mail, rcpt, header, eom],
    actions=Actions.ADD_HEADER
    | Actions.REPLACE_HEADER
    | Actions.ADD_RECIPIENT
    | Actions.REMOVE_RECIPIENT
    | Actions.REPLACE_BODY
    | Actions.QUARANTINE,
)
