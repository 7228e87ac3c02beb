"""The examples that behave the same behind Postfix and Sendmail, each run by
the command line behind both (the attachment filter's strip mode in a
thread: it is a module setting). The rest: test_postfix_examples.py and
test_sendmail_examples.py."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest

from . import attachments
from ._milter_runner import CliMilter, header_values, split_first_header
from .capture import CaptureServer
from .mta import Mta

SENDER = "sender@example.test"


@pytest.fixture
def example(mta: Mta, request: pytest.FixtureRequest) -> Iterator[CliMilter]:
    """``python -m triomilter serve examples/NAME.py`` in front of the MTA."""
    with CliMilter(f"examples/{request.param}.py") as milter:
        mta.use(milter)
        yield milter
        assert milter.stop() == 0, milter.log_text()


def _body(size: int, marker: bytes = b"") -> bytes:
    line = b"an ordinary line of body text, nothing to see here \xc3\xa9\r\n"
    lines = line * (size // len(line))
    return lines[: len(lines) // 2] + marker + lines[len(lines) // 2 :]


@pytest.mark.parametrize("example", ["body_policy"], indirect=True)
def test_body_policy(mta: Mta, capture: CaptureServer, example: CliMilter) -> None:
    eicar = b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*\r\n"
    fine = _body(300 * 1024)
    with mta.smtp(timeout=60) as s:
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
def test_async_lookup(mta: Mta, capture: CaptureServer, example: CliMilter) -> None:
    with mta.smtp() as s:
        s.sendmail(SENDER, ["r@example.test"], b"Subject: lookup\r\n\r\nbody\r\n")
    (msg,) = capture.wait_for(1)
    _, rest = split_first_header(msg.data)
    assert rest == b"Subject: lookup\r\nX-Client-Reputation: trusted (loopback)\r\n\r\nbody\r\n"


@pytest.mark.parametrize("example", ["attachment_filter"], indirect=True)
def test_attachment_filter(mta: Mta, capture: CaptureServer, example: CliMilter) -> None:
    clean, dangerous = attachments.clean_mail(), attachments.dangerous_mail()
    single = attachments.single_part_mail()
    arrived = attachments.send_each(mta.smtp(timeout=60), capture, [clean, dangerous, single])
    # Clean: byte for byte as sent, but for the one header.
    assert arrived[0] == attachments.with_header(clean, b"clean")
    # The executable renamed in a new body of many packets; the rest as sent.
    attachments.check_renamed(dangerous, arrived[1])
    # A message that is the executable: its headers replaced ("content-type"
    # found by any case), the sender's X-Attachment-Filter deleted, the body
    # unchanged.
    attachments.check_single_part_renamed(arrived[2])
    assert arrived[2].partition(b"\r\n\r\n")[2] == single.partition(b"\r\n\r\n")[2]


def test_attachment_filter_strip(
    mta: Mta, capture: CaptureServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    attachment_filter = attachments.load_attachment_filter()
    monkeypatch.setattr(attachment_filter, "ACTION", "strip")
    forwarded, single = attachments.forwarded_mail(), attachments.single_part_mail()
    with mta.serving(attachment_filter.milter):
        arrived = attachments.send_each(mta.smtp(timeout=60), capture, [forwarded, single])
    attachments.check_stripped(forwarded, arrived[0])
    attachments.check_single_part_stripped(arrived[1])
