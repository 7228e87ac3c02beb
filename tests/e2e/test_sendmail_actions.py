"""End-of-message actions, as Sendmail applies them to the delivered message:
the Sendmail counterpart of test_postfix_actions.py, with the same milter.

Each test compares the bytes and envelope the capture server got or, for
quarantine and ESMTP arguments the capture server cannot see (it offers no
DSN), Sendmail's queue file.
"""

from __future__ import annotations

from triomilter import Context

from ._milter_runner import split_first_header, use_sendmail_milter
from .capture import CapturedMessage, CaptureServer
from .mta import Mta
from .scenarios import (
    BODY,
    ORIGINAL,
    ORIGINAL_HEADERS,
    SENDER,
    EomChanges,
    eom_milter,
)
from .sendmail import PrivateSendmail


def _send_one(
    sendmail: PrivateSendmail,
    capture: CaptureServer,
    changes: EomChanges,
    data: bytes,
    rcpts: list[str],
    sender: str = SENDER,
) -> CapturedMessage:
    return Mta(sendmail).send_one(eom_milter(changes), capture, data, rcpts, sender)


def test_header_changes(sendmail: PrivateSendmail, capture: CaptureServer) -> None:
    async def changes(ctx: Context[object]) -> None:
        await ctx.api.add_header("X-Added", "appended\n\tand folded")
        await ctx.api.insert_header(0, "X-Top", "above Received")
        # Index 3: Sendmail counts the headers in its list, which include
        # the Return-Path:, Date: and Message-Id: it will not write (the relay
        # mailer has no P flag, the fixture removed D, F, M): X-Top,
        # Return-Path, Received, so before the Date: it prepared, above From:
        # (Postfix puts it below From:).
        await ctx.api.insert_header(3, "X-Third", "before From")
        await ctx.api.replace_header("X-B", 2, "new second b")
        await ctx.api.replace_header("X-Delete-Me", 1, None)
        await ctx.api.replace_header("x-folded", 1, "new\n folded")  # matched in any case
        await ctx.api.add_header(b"X-Raw", b"bytes \xe2\x9c\x93 value")

    msg = _send_one(sendmail, capture, changes, ORIGINAL, ["r@example.test"])
    top, rest = split_first_header(msg.data)
    assert top == b"X-Top: above Received\r\n"  # above Sendmail's own Received:
    received, rest = split_first_header(rest)
    assert received.startswith(b"Received: from client.test.invalid (localhost [127.0.0.1])")
    assert rest == (
        b"X-Third: before From\r\n"
        b"From: Sender <sender@example.test>\r\n"
        b"Subject: header changes\r\n"
        b"X-B: first b\r\n"
        b"X-B: new second b\r\n"
        b"X-Folded: new\r\n folded\r\n"  # Sendmail keeps the header's own spelling
        b"X-Added: appended\r\n\tand folded\r\n"
        b"X-Raw: bytes \xe2\x9c\x93 value\r\n"
        b"\r\n" + BODY
    )
    log = sendmail.log_text()
    assert "Milter (myfilter) insert (0): header: X-Top: above Received" in log
    assert "Milter (myfilter) delete: header X-Delete-Me: going away" in log


def test_replace_header_beyond_the_last_occurrence_adds(
    sendmail: PrivateSendmail, capture: CaptureServer
) -> None:
    """A change of the 5th X-B when there are two adds one ("change (add)"
    in the log), like Postfix, but Sendmail puts it before the first X-B
    field instead of at the end of the header."""

    async def changes(ctx: Context[object]) -> None:
        await ctx.api.replace_header("X-B", 5, "fifth b")  # only two exist
        await ctx.api.replace_header("X-Missing", 1, None)  # deleting nothing is fine

    msg = _send_one(sendmail, capture, changes, ORIGINAL, ["r@example.test"])
    _, rest = split_first_header(msg.data)
    first_b = ORIGINAL_HEADERS.index(b"X-B: first b")
    headers = ORIGINAL_HEADERS[:first_b] + b"X-B: fifth b\r\n" + ORIGINAL_HEADERS[first_b:]
    assert rest == headers + b"\r\n" + BODY
    log = sendmail.log_text()
    assert "Milter (myfilter) change (add): header: X-B: fifth b" in log
    assert "Milter (myfilter) delete (noop): header: X-Missing" in log


def test_envelope_changes(sendmail: PrivateSendmail, capture: CaptureServer) -> None:
    async def changes(ctx: Context[object]) -> None:
        await ctx.api.add_recipient("<added@example.test>")
        await ctx.api.remove_recipient("<removed@example.test>")
        await ctx.api.replace_sender("<new-sender@example.test>")

    rcpts = ["kept@example.test", "removed@example.test"]
    data = b"Subject: envelope\r\n\r\n" + BODY
    msg = _send_one(sendmail, capture, changes, data, rcpts)
    assert msg.mail_from == "new-sender@example.test"
    assert sorted(msg.rcpt_tos) == ["added@example.test", "kept@example.test"]
    _, rest = split_first_header(msg.data)
    assert rest == data  # the content is untouched
    log = sendmail.log_text()
    assert "Milter (myfilter) delete: rcpt <removed@example.test>" in log
    assert "Milter (myfilter) chgfrom: <new-sender@example.test>" in log


def test_quarantine_with_esmtp_args_of_sender_and_recipient(
    sendmail: PrivateSendmail, capture: CaptureServer
) -> None:
    """QUARANTINE: the job stays in the queue as an ``hf`` file with the
    reason; the queue file also shows what the capture server cannot: the
    replaced sender's RET/ENVID (``F`` flag ``n`` = RET=HDRS, ``Z`` = ENVID,
    both replacing the client's) and NOTIFY=NEVER (``N``) of an added
    recipient.  Released, it is delivered with the changes."""

    async def changes(ctx: Context[object]) -> None:
        await ctx.api.add_recipient("<never@example.test>", "NOTIFY=NEVER")
        await ctx.api.add_recipient("<plain@example.test>")
        await ctx.api.replace_sender("<>", "RET=HDRS ENVID=milter-envid")
        await ctx.api.add_header("X-Checked", "yes")
        await ctx.api.quarantine("held for inspection")

    data = b"Subject: quarantine\r\n\r\n" + BODY
    with use_sendmail_milter(sendmail, eom_milter(changes)), sendmail.smtp() as s:
        assert (
            s.sendmail(SENDER, ["r@example.test"], data, ["RET=FULL", "ENVID=client-envid"]) == {}
        )
    sendmail.wait_for_log(r"milter=myfilter, quarantine=held for inspection")
    (held,) = sendmail.queue()
    assert held.quarantined and held.quarantine_reason == "held for inspection"
    assert held.sender == "<>"
    assert held.recipient_records == [
        "PFD:<r@example.test>",  # primary, NOTIFY=FAILURE,DELAY (the default)
        "PN:<never@example.test>",  # NOTIFY=NEVER
        "PFD:<plain@example.test>",
    ]
    envelope = [line for line in held.lines if line[:1] in ("F", "Z")]
    assert envelope == ["Fdns", "Zmilter-envid"]  # d: RET given, n: RET=HDRS
    assert "X-Checked: yes" in held.headers[-1]
    queue_listing = sendmail.mailq(quarantined=True)
    assert "QUARANTINE: held for inspection" in queue_listing
    assert held.queue_id in queue_listing
    assert "is empty" in sendmail.mailq()  # a plain mailq skips hf files
    assert capture.wait_quiet(0.2) == []

    sendmail.release_quarantine(held.queue_id)
    (msg,) = capture.wait_for(1)
    assert msg.mail_from == ""
    assert sorted(msg.rcpt_tos) == ["never@example.test", "plain@example.test", "r@example.test"]
    _, rest = split_first_header(msg.data)
    assert rest == b"Subject: quarantine\r\nX-Checked: yes\r\n\r\n" + BODY
    sendmail.wait_for_log(rf"{held.queue_id}: unquarantine")
    sendmail.wait_queue_empty()
