"""The examples, each run by the command line behind a real Postfix (the
attachment filter's strip mode in a thread: it is a module setting)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest

from . import attachments
from ._milter_runner import (
    CliMilter,
    header_values,
    notify_flags,
    postcat,
    split_first_header,
    use_milter,
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


def _body(size: int, marker: bytes = b"") -> bytes:
    line = b"an ordinary line of body text, nothing to see here \xc3\xa9\r\n"
    lines = line * (size // len(line))
    return lines[: len(lines) // 2] + marker + lines[len(lines) // 2 :]


@pytest.mark.parametrize("example", ["body_policy"], indirect=True)
def test_body_policy(postfix: PrivatePostfix, capture: CaptureServer, example: CliMilter) -> None:
    eicar = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*\r\n"
    fine = _body(300 * 1024)
    with postfix.smtp(timeout=60) as s:
        s.ehlo()
        # Content: found mid-body; SKIP spares the rest, rejected at the end.
        assert s.mail(SENDER)[0] == 250 and s.rcpt("r@example.test")[0] == 250
        reply = s.data(b"Subject: hello\r\n\r\n" + _body(1024 * 1024, eicar))
        assert reply == (554, b"5.7.1 Message refused: forbidden content")
        # Subject: rejected at end of headers, reported at the end of DATA.
        assert s.mail(SENDER)[0] == 250 and s.rcpt("r@example.test")[0] == 250
        reply = s.data(b"Subject: BUY NOW, cheap\r\n\r\n" + fine)
        assert reply == (550, b"5.7.1 Message refused: its subject looks like spam")
        # Size: over the example's 10 MiB limit.
        assert s.mail(SENDER)[0] == 250 and s.rcpt("r@example.test")[0] == 250
        reply = s.data(b"Subject: huge\r\n\r\n" + _body(10 * 1024 * 1024 + 4096))
        assert reply == (552, b"5.3.4 Message body exceeds 10485760 bytes")
        # Everything else gets size and hash headers.
        s.sendmail(SENDER, ["r@example.test"], b"Subject: fine\r\n\r\n" + fine)
    (msg,) = capture.wait_for(1)
    assert msg.body == fine
    assert header_values(msg.data, b"X-Body-Size") == [str(len(fine)).encode()]
    assert header_values(msg.data, b"X-Body-SHA256") == [hashlib.sha256(fine).hexdigest().encode()]
    assert capture.wait_quiet(0.2) == [msg]


@pytest.mark.parametrize("example", ["async_lookup"], indirect=True)
def test_async_lookup(postfix: PrivatePostfix, capture: CaptureServer, example: CliMilter) -> None:
    with postfix.smtp() as s:
        s.sendmail(SENDER, ["r@example.test"], b"Subject: lookup\r\n\r\nbody\r\n")
    (msg,) = capture.wait_for(1)
    _, rest = split_first_header(msg.data)
    assert rest == b"Subject: lookup\r\nX-Client-Reputation: trusted (loopback)\r\n\r\nbody\r\n"


@pytest.mark.parametrize("example", ["attachment_filter"], indirect=True)
def test_attachment_filter(
    postfix: PrivatePostfix, capture: CaptureServer, example: CliMilter
) -> None:
    clean, dangerous = attachments.clean_mail(), attachments.dangerous_mail()
    single = attachments.single_part_mail()
    arrived = attachments.send_each(postfix.smtp(timeout=60), capture, [clean, dangerous, single])
    # Clean: byte for byte as sent, but for the one header.
    assert arrived[0] == attachments.with_header(clean, b"clean")
    # The executable renamed in a new body of many packets; the rest as sent.
    attachments.check_renamed(dangerous, arrived[1])
    # A message that is the executable: its headers replaced (Postfix finds
    # "content-type" by any case), the sender's X-Attachment-Filter deleted,
    # the body unchanged.
    attachments.check_single_part_renamed(arrived[2])
    assert arrived[2].partition(b"\r\n\r\n")[2] == single.partition(b"\r\n\r\n")[2]


def test_attachment_filter_strip(
    postfix: PrivatePostfix, capture: CaptureServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    attachment_filter = attachments.load_attachment_filter()
    monkeypatch.setattr(attachment_filter, "ACTION", "strip")
    forwarded, single = attachments.forwarded_mail(), attachments.single_part_mail()
    with use_milter(postfix, attachment_filter.milter):
        arrived = attachments.send_each(postfix.smtp(timeout=60), capture, [forwarded, single])
    attachments.check_stripped(forwarded, arrived[0])
    attachments.check_single_part_stripped(arrived[1])
