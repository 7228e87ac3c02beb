"""A triomilter milter making every kind of change, for `triomilter check` and `tap` tests.

Its twin, ``pymilter_modifier.py``, does exactly the same on libmilter
(pymilter), so the same command line must print the same changes for both.

- RCPT ``<refused@example.net>``: 550 5.1.1 (that recipient only).
- Subject ``please reject`` / ``please tempfail`` / ``please discard`` at
  end of message: a custom 550, a plain TEMPFAIL, DISCARD.
- Any other message: every header change (add, a folded and an 8-bit add,
  insert at 1, change the Subject, delete ``X-Remove``), every envelope
  change (add a recipient, one with NOTIFY=NEVER, remove
  ``<removed@example.net>``, a new sender with RET=HDRS), a progress
  packet; the body is replaced if the Subject has ``body`` in it, and the
  message quarantined if it has ``quarantine``.
"""

from __future__ import annotations

from triomilter import Actions, Context, Milter, Status, on_eom, on_header, on_rcpt

REFUSED = "<refused@example.net>"
NEW_BODY = b"The body was replaced.\r\nSecond line.\r\n"


@on_rcpt
async def rcpt(ctx: Context[None, dict[str, str]], args: list[str]) -> Status:
    if args[0] == REFUSED:
        ctx.api.set_error_reply("550", "5.1.1", "No such user here")
        return Status.REJECT
    return Status.CONTINUE


@on_header
async def header(ctx: Context[None, dict[str, str]], name: str, value: bytes) -> Status:
    # bytes: a header that is not UTF-8 is fine (the Subject is kept as pymilter
    # gives it, UTF-8 with surrogates for the other bytes).
    if name.lower() == "subject":
        ctx.message_data["subject"] = value.decode("utf-8", "surrogateescape")
    return Status.CONTINUE


@on_eom
async def eom(ctx: Context[None, dict[str, str]]) -> Status:
    subject = ctx.message_data.get("subject", "")
    if subject == "please reject":
        ctx.api.set_error_reply("550", "5.7.1", "Rejected by the test milter")
        return Status.REJECT
    if subject == "please tempfail":
        return Status.TEMPFAIL
    if subject == "please discard":
        return Status.DISCARD
    api = ctx.api
    await api.signal_progress()
    await api.add_header("X-Added", "added value")
    await api.add_header("X-Folded", "first line\n\tsecond line")
    await api.add_header("X-Utf8", "Grüße ✓")
    await api.insert_header(1, "X-Inserted", "at index 1")
    await api.replace_header(
        "Subject", 1, f"[checked] {subject}".encode("utf-8", "surrogateescape")
    )
    await api.replace_header("X-Remove", 1, None)
    await api.add_recipient("<added@example.net>")
    await api.add_recipient("<never@example.net>", "NOTIFY=NEVER")
    await api.remove_recipient("<removed@example.net>")
    await api.replace_sender("<new-sender@example.org>", "RET=HDRS")
    if "body" in subject:
        await api.append_body_chunk(NEW_BODY)
    if "quarantine" in subject:
        await api.quarantine("held by the test milter")
    return Status.CONTINUE


milter = Milter(
    "modifier",
    handlers=[rcpt, header, eom],
    actions=Actions.ADD_HEADER
    | Actions.REPLACE_HEADER
    | Actions.ADD_RECIPIENT
    | Actions.ADD_RECIPIENT_EXT
    | Actions.REMOVE_RECIPIENT
    | Actions.REPLACE_SENDER
    | Actions.REPLACE_BODY
    | Actions.QUARANTINE,
    message_data=dict,
)
