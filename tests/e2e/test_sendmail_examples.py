"""The examples whose results are Sendmail's own, each run by the command
line behind a real Sendmail (the Sendmail counterpart of
test_postfix_examples.py; the rest: test_examples_behind_mta.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ._milter_runner import CliMilter, split_first_header
from .capture import CaptureServer
from .sendmail import PrivateSendmail

SENDER = "sender@example.test"


@pytest.fixture
def example(sendmail: PrivateSendmail, request: pytest.FixtureRequest) -> Iterator[CliMilter]:
    """``python -m triomilter serve examples/NAME.py`` in front of ``sendmail``."""
    with CliMilter(f"examples/{request.param}.py") as milter:
        sendmail.set_milter(milter.sendmail_spec)
        yield milter
        assert milter.stop() == 0, milter.log_text()


@pytest.mark.parametrize("example", ["header_tagger"], indirect=True)
def test_header_tagger(
    sendmail: PrivateSendmail, capture: CaptureServer, example: CliMilter
) -> None:
    with sendmail.smtp() as s:
        s.sendmail(SENDER, ["a@example.test"], b"Subject: one\r\n\r\nfirst\r\n")
        s.sendmail(SENDER, ["b@example.test"], b"Subject: two\r\n\r\nsecond\r\n")
    msgs = capture.wait_for(2)
    for msg, subject, body in zip(
        sorted(msgs, key=lambda m: m.rcpt_tos), [b"one", b"two"], [b"first", b"second"], strict=True
    ):
        _, rest = split_first_header(msg.data)
        assert (
            rest
            == (
                b"Subject: " + subject + b"\r\n"
                b"X-Triomilter-Tagged: localhost [127.0.0.1]\r\n"  # Sendmail names the client
                b"\r\n" + body + b"\r\n"
            )
        )


@pytest.mark.parametrize("example", ["recipient_policy"], indirect=True)
def test_recipient_policy(
    sendmail: PrivateSendmail, capture: CaptureServer, example: CliMilter
) -> None:
    # Queue-only delivery mode: the messages wait in the queue, where the
    # archive recipient's DSN flags can be read (the capture server offers no
    # DSN, so it never sees them), until the queue run below.
    sendmail.set_milter(example.sendmail_spec, mc_extra=["define(`confDELIVERY_MODE', `q')dnl"])
    rcpts = ["CEO@example.test", "spamtrap@example.test", "bob@example.test"]
    with sendmail.smtp() as s:
        refused = s.sendmail("archived@example.test", rcpts, b"Subject: policy\r\n\r\nbody\r\n")
        # Not an archived recipient: no archive copy.
        s.sendmail(SENDER, ["bob@example.test"], b"Subject: plain\r\n\r\nbody\r\n")
    # Sendmail puts the address in front of a multi-line reply's first line.
    assert refused == {
        "spamtrap@example.test": (
            550,
            b"5.7.1 <spamtrap@example.test>... Mail to <spamtrap@example.test> is not "
            b"accepted here.\n"
            b"5.7.1 Contact postmaster@example.test.",
        )
    }
    queued = {m.sender: m for m in sendmail.wait_queued(2)}
    # NOTIFY=NEVER is the "N" recipient flag; the others have Sendmail's
    # default FAILURE,DELAY ("FD"); P: a primary (envelope) address.
    assert queued["<archived@example.test>"].recipient_records == [
        "PFD:<CEO@example.test>",
        "PFD:<bob@example.test>",
        "PN:<archive@example.test>",
    ]
    assert queued[f"<{SENDER}>"].recipient_records == ["PFD:<bob@example.test>"]
    sendmail.flush()
    msgs = capture.wait_for(2)
    plain = next(m for m in msgs if m.mail_from == SENDER)
    assert plain.rcpt_tos == ["bob@example.test"]
    archived = next(m for m in msgs if m.mail_from == "archived@example.test")
    assert sorted(archived.rcpt_tos) == [
        "CEO@example.test",
        "archive@example.test",
        "bob@example.test",
    ]
    sendmail.wait_queue_empty()
