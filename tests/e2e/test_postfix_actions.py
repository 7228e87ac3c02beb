"""End-of-message actions, as Postfix applies them to the delivered message.

Each test runs a milter whose ``on_eom`` makes some changes, sends one message
through Postfix and compares the bytes and envelope the capture server got
(or, for quarantine and recipient DSN flags, Postfix's queue file).
"""

from __future__ import annotations

from triomilter import (
    Context,
)

from ._milter_runner import notify_flags, postcat, split_first_header, use_milter
from .capture import CapturedMessage, CaptureServer
from .mta import Mta
from .postfix import PrivatePostfix
from .scenarios import (
    BODY,
    ORIGINAL,
    ORIGINAL_HEADERS,
    SENDER,
    EomChanges,
    eom_milter,
)


def _send_one(
    postfix: PrivatePostfix,
    capture: CaptureServer,
    changes: EomChanges,
    data: bytes,
    rcpts: list[str],
    sender: str = SENDER,
) -> CapturedMessage:
    return Mta(postfix).send_one(eom_milter(changes), capture, data, rcpts, sender)


def test_header_changes(postfix: PrivatePostfix, capture: CaptureServer) -> None:
    async def changes(ctx: Context[object]) -> None:
        await ctx.api.add_header("X-Added", "appended\n\tand folded")
        await ctx.api.insert_header(0, "X-Top", "above Received")
        # Insert indices count the headers as delivered: X-Top, Received, ...
        await ctx.api.insert_header(3, "X-Third", "after From")
        await ctx.api.replace_header("X-B", 2, "new second b")
        await ctx.api.replace_header("X-Delete-Me", 1, None)
        await ctx.api.replace_header("x-folded", 1, "new\n folded")  # matched in any case
        await ctx.api.add_header(b"X-Raw", b"bytes \xe2\x9c\x93 value")

    msg = _send_one(postfix, capture, changes, ORIGINAL, ["r@example.test"])
    top, rest = split_first_header(msg.data)
    assert top == b"X-Top: above Received\r\n"
    received, rest = split_first_header(rest)
    assert received.startswith(b"Received: from client.test.invalid")
    assert rest == (
        b"From: Sender <sender@example.test>\r\n"
        b"X-Third: after From\r\n"
        b"Subject: header changes\r\n"
        b"X-B: first b\r\n"
        b"X-B: new second b\r\n"
        b"x-folded: new\r\n folded\r\n"  # Postfix writes the name as the milter spelled it
        b"X-Added: appended\r\n\tand folded\r\n"
        b"X-Raw: bytes \xe2\x9c\x93 value\r\n"
        b"\r\n" + BODY
    )


def test_replace_header_beyond_the_last_occurrence_appends(
    postfix: PrivatePostfix, capture: CaptureServer
) -> None:
    async def changes(ctx: Context[object]) -> None:
        await ctx.api.replace_header("X-B", 5, "fifth b")  # only two exist
        await ctx.api.replace_header("X-Missing", 1, None)  # deleting nothing is fine

    msg = _send_one(postfix, capture, changes, ORIGINAL, ["r@example.test"])
    _, rest = split_first_header(msg.data)
    assert rest == ORIGINAL_HEADERS + b"X-B: fifth b\r\n\r\n" + BODY


def test_envelope_changes(postfix: PrivatePostfix, capture: CaptureServer) -> None:
    async def changes(ctx: Context[object]) -> None:
        await ctx.api.add_recipient("<added@example.test>")
        await ctx.api.remove_recipient("<removed@example.test>")
        await ctx.api.replace_sender("<new-sender@example.test>")

    rcpts = ["kept@example.test", "removed@example.test"]
    data = b"Subject: envelope\r\n\r\n" + BODY
    msg = _send_one(postfix, capture, changes, data, rcpts)
    assert msg.mail_from == "new-sender@example.test"
    assert sorted(msg.rcpt_tos) == ["added@example.test", "kept@example.test"]
    _, rest = split_first_header(msg.data)
    assert rest == data  # the content is untouched


def test_replace_sender_with_esmtp_args(postfix: PrivatePostfix, capture: CaptureServer) -> None:
    """Postfix keeps RET and ENVID of a replaced sender: they follow the
    client's in the queue file (held by QUARANTINE to read it)."""

    async def changes(ctx: Context[object]) -> None:
        await ctx.api.replace_sender("<>", "RET=HDRS ENVID=milter-envid")
        await ctx.api.quarantine("to read the queue file")

    data = b"Subject: null sender\r\n\r\n" + BODY
    with use_milter(postfix, eom_milter(changes)), postfix.smtp() as s:
        s.sendmail(SENDER, ["r@example.test"], data, ["RET=FULL", "ENVID=client-envid"])
    postfix.wait_for_log(r"milter-hold: ")
    (held,) = postfix.hold_queue()
    records = postcat(postfix, held.queue_id)
    envelope = records[: records.index("sender: ")]  # the null sender
    dsn = [line for line in envelope if "envelope_id=" in line or "ret_flags=" in line]
    assert dsn == [
        "named_attribute: envelope_id=client-envid",
        "named_attribute: ret_flags=1",  # FULL
        "named_attribute: envelope_id=milter-envid",
        "named_attribute: ret_flags=2",  # HDRS
    ]
    postfix.release_hold()
    (msg,) = capture.wait_for(1)
    assert msg.mail_from == ""
    assert split_first_header(msg.data)[1] == data


def test_quarantine_and_add_recipient_with_notify_never(
    postfix: PrivatePostfix, capture: CaptureServer
) -> None:
    """QUARANTINE puts the message on hold; ADD_RECIPIENT_EXT's NOTIFY=NEVER
    is recorded for that recipient (Postfix's DSN_NOTIFY_NEVER is 1; the
    capture server offers no DSN, so the queue file is where it shows)."""

    async def changes(ctx: Context[object]) -> None:
        await ctx.api.add_recipient("<never@example.test>", "NOTIFY=NEVER")
        await ctx.api.add_recipient("<plain@example.test>")
        await ctx.api.add_header("X-Checked", "yes")
        await ctx.api.quarantine("held for inspection")

    data = b"Subject: quarantine\r\n\r\n" + BODY
    with use_milter(postfix, eom_milter(changes)), postfix.smtp() as s:
        assert s.sendmail(SENDER, ["r@example.test"], data) == {}
    postfix.wait_for_log(r"milter-hold: END-OF-MESSAGE from .*: milter triggers HOLD action")
    (held,) = postfix.hold_queue()
    assert sorted(held.recipients) == ["never@example.test", "plain@example.test", "r@example.test"]
    flags = notify_flags(postcat(postfix, held.queue_id))
    assert flags == {"r@example.test": None, "never@example.test": "1", "plain@example.test": None}
    assert capture.wait_quiet(0.2) == []

    postfix.release_hold()
    (msg,) = capture.wait_for(1)
    assert sorted(msg.rcpt_tos) == ["never@example.test", "plain@example.test", "r@example.test"]
    _, rest = split_first_header(msg.data)
    assert rest == b"Subject: quarantine\r\nX-Checked: yes\r\n\r\n" + BODY
    postfix.wait_queue_empty()
