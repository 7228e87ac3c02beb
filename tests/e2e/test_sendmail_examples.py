"""The examples, each run by the command line behind a real Sendmail
(the Sendmail counterpart of test_postfix_examples.py)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest

from . import attachments
from ._milter_runner import CliMilter, header_values, split_first_header
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


def _body(size: int, marker: bytes = b"") -> bytes:
    line = b"an ordinary line of body text, nothing to see here \xc3\xa9\r\n"
    lines = line * (size // len(line))
    return lines[: len(lines) // 2] + marker + lines[len(lines) // 2 :]


@pytest.mark.parametrize("example", ["body_policy"], indirect=True)
def test_body_policy(sendmail: PrivateSendmail, capture: CaptureServer, example: CliMilter) -> None:
    eicar = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*\r\n"
    fine = _body(300 * 1024)
    with sendmail.smtp(timeout=60) as s:
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
def test_async_lookup(
    sendmail: PrivateSendmail, capture: CaptureServer, example: CliMilter
) -> None:
    with sendmail.smtp() as s:
        s.sendmail(SENDER, ["r@example.test"], b"Subject: lookup\r\n\r\nbody\r\n")
    (msg,) = capture.wait_for(1)
    _, rest = split_first_header(msg.data)
    assert rest == b"Subject: lookup\r\nX-Client-Reputation: trusted (loopback)\r\n\r\nbody\r\n"


@pytest.mark.parametrize("example", ["attachment_filter"], indirect=True)
def test_attachment_filter(
    sendmail: PrivateSendmail, capture: CaptureServer, example: CliMilter
) -> None:
    clean, dangerous = attachments.clean_mail(), attachments.dangerous_mail()
    single = attachments.single_part_mail()
    arrived = attachments.send_each(sendmail.smtp(timeout=60), capture, [clean, dangerous, single])
    assert arrived[0] == attachments.with_header(clean, b"clean")
    attachments.check_renamed(dangerous, arrived[1])
    attachments.check_single_part_renamed(arrived[2])
    assert arrived[2].partition(b"\r\n\r\n")[2] == single.partition(b"\r\n\r\n")[2]
