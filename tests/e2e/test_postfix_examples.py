"""The examples whose results are Postfix's own, each run by the command line
behind a real Postfix (the rest, the same behind both MTAs:
test_examples_behind_mta.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ._milter_runner import (
    CliMilter,
    notify_flags,
    postcat,
    split_first_header,
)
from .capture import CaptureServer
from .postfix import PrivatePostfix

SENDER = "sender@example.test"


@pytest.fixture
def example(postfix: PrivatePostfix, request: pytest.FixtureRequest) -> Iterator[CliMilter]:
    """``python -m triomilter serve examples/NAME.py`` in front of ``postfix``."""
    with CliMilter(f"examples/{request.param}.py") as milter:
        postfix.set_milters(milter.spec)
        yield milter
        assert milter.stop() == 0, milter.log_text()


@pytest.mark.parametrize("example", ["header_tagger"], indirect=True)
def test_header_tagger(postfix: PrivatePostfix, capture: CaptureServer, example: CliMilter) -> None:
    with postfix.smtp() as s:
        s.sendmail(SENDER, ["a@example.test"], b"Subject: one\r\n\r\nfirst\r\n")
        s.sendmail(SENDER, ["b@example.test"], b"Subject: two\r\n\r\nsecond\r\n")
    msgs = capture.wait_for(2)
    for msg, subject, body in zip(
        sorted(msgs, key=lambda m: m.rcpt_tos), [b"one", b"two"], [b"first", b"second"], strict=True
    ):
        _, rest = split_first_header(msg.data)
        assert rest == (
            b"Subject: " + subject + b"\r\n"
            b"X-Triomilter-Tagged: [127.0.0.1] [127.0.0.1]\r\n"
            b"\r\n" + body + b"\r\n"
        )


@pytest.mark.parametrize("example", ["recipient_policy"], indirect=True)
def test_recipient_policy(
    postfix: PrivatePostfix, capture: CaptureServer, example: CliMilter
) -> None:
    # Hold this sender's mail, to read the archive recipient's DSN flags in
    # the queue file (the capture server offers no DSN, so it never sees them).
    postfix.configure(
        {"smtpd_sender_restrictions": "check_sender_access inline:{hold@example.test=HOLD}"}
    )
    rcpts = ["CEO@example.test", "spamtrap@example.test", "bob@example.test"]
    with postfix.smtp() as s:
        refused = s.sendmail("hold@example.test", rcpts, b"Subject: policy\r\n\r\nbody\r\n")
        # Not an archived recipient: no archive copy.
        s.sendmail(SENDER, ["bob@example.test"], b"Subject: plain\r\n\r\nbody\r\n")
    assert refused == {
        "spamtrap@example.test": (
            550,
            b"5.7.1 Mail to <spamtrap@example.test> is not accepted here.\n"
            b"5.7.1 Contact postmaster@example.test.",
        )
    }
    (plain,) = capture.wait_for(1)
    assert plain.mail_from == SENDER and plain.rcpt_tos == ["bob@example.test"]

    postfix.wait_for_log(r": hold: ")
    (held,) = postfix.hold_queue()
    # NOTIFY=NEVER is Postfix's notify_flags=1; the others have no DSN flags.
    assert notify_flags(postcat(postfix, held.queue_id)) == {
        "CEO@example.test": None,
        "bob@example.test": None,
        "archive@example.test": "1",
    }
    postfix.release_hold()
    msgs = capture.wait_for(2)
    archived = next(m for m in msgs if m.mail_from == "hold@example.test")
    assert sorted(archived.rcpt_tos) == [
        "CEO@example.test",
        "archive@example.test",
        "bob@example.test",
    ]
