"""A recipient policy: refuse some recipients, archive the mail of others.

- A recipient in ``BLOCKED`` is rejected (that recipient only) with a
  multi-line 550 reply; the message goes on for the other recipients.
- Mail for a recipient in ``ARCHIVED`` gets a blind copy to ``ARCHIVE`` added
  at end of message, with ``NOTIFY=NEVER`` so the archive never bounces.

Run it:   triomilter serve examples/recipient_policy.py --socket inet:8895@127.0.0.1
"""

from __future__ import annotations

import attrs

from triomilter import (
    Actions,
    Context,
    Milter,
    Ok,
    Result,
    Status,
    on_abort,
    on_eom,
    on_mail,
    on_rcpt,
)

BLOCKED = frozenset({"<spamtrap@example.test>", "<former-employee@example.test>"})
ARCHIVED = frozenset({"<ceo@example.test>", "<legal@example.test>"})
ARCHIVE = "<archive@example.test>"


@attrs.define
class Message:
    """Per-message state; reset at every MAIL FROM."""

    archive: bool = False


def _address(arg: str) -> str:
    return arg.strip().lower()


@on_mail
async def mail(ctx: Context[Message], args: list[str]) -> Status:
    ctx.data = Message()
    return Status.CONTINUE


@on_rcpt
async def rcpt(ctx: Context[Message], args: list[str]) -> Result[Status]:
    recipient = _address(args[0])
    if recipient in BLOCKED:
        ctx.api.set_error_reply(
            "550",
            "5.7.1",
            [f"Mail to {recipient} is not accepted here.", "Contact postmaster@example.test."],
        )
        return Ok(Status.REJECT)
    if recipient in ARCHIVED and ctx.data is not None:
        ctx.data.archive = True
    return Ok(Status.CONTINUE)


@on_eom
async def eom(ctx: Context[Message]) -> Result[Status]:
    if ctx.data is not None and ctx.data.archive:
        # Raises a MilterError if the MTA did not grant ADD_RECIPIENT_EXT:
        # in a Result handler that is a TEMPFAIL, not a panic.
        await ctx.api.add_recipient(ARCHIVE, "NOTIFY=NEVER")
    return Ok(Status.CONTINUE)


@on_abort
async def abort(ctx: Context[Message]) -> None:
    ctx.data = None


milter = Milter(
    "recipient-policy",
    handlers=[mail, rcpt, eom, abort],
    actions=Actions.ADD_RECIPIENT_EXT,
)
