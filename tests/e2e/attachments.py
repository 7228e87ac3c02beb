"""Messages for examples/attachment_filter.py behind a real MTA, and what must
arrive of them (shared by the Postfix and Sendmail tests; not a test module).

Each message is written by ``email.message.EmailMessage`` with CRLF line
endings, as a mail client sends it. The checks parse the delivered message
back, and compare what the filter must not touch byte for byte.
"""

from __future__ import annotations

import base64
import email.policy
import importlib.util
import re
import smtplib
import sys
import types
from collections.abc import Sequence
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

from ._milter_runner import split_first_header
from .capture import CaptureServer

HEADER = b"X-Attachment-Filter"
EXE = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff\x00\x00" * 128 * 1024  # 2 MiB
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj << /Type /Catalog >> endobj\n" * 100
TEXT = "Hello,\n\nthe documents, as promised. Grüße!\n"


def load_attachment_filter() -> types.ModuleType:
    """examples/attachment_filter.py, imported in this process (the name matches
    tests/examples/_load.py, so both share one module)."""
    name = "triomilter_example_attachment_filter"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[2] / "examples" / "attachment_filter.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


def send_each(smtp: smtplib.SMTP, capture: CaptureServer, messages: Sequence[bytes]) -> list[bytes]:
    """Send each message to a recipient of its own (on one SMTP connection); what
    arrived of each, in order, without the MTA's Received: header."""
    with smtp as s:
        for n, data in enumerate(messages):
            s.sendmail("sender@example.test", [f"r{n}@example.test"], data)
    arrived = sorted(capture.wait_for(len(messages), timeout=30), key=lambda m: m.rcpt_tos)
    return [split_first_header(msg.data)[1] for msg in arrived]


def _new(subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "Alice <sender@example.test>"
    msg["To"] = "Bob <r@example.test>"
    msg["Subject"] = subject
    msg["Date"] = "Thu, 04 Dec 2025 10:00:00 +0000"
    msg["Message-ID"] = f"<{subject.replace(' ', '-')}@example.test>"
    return msg


def _wire(msg: EmailMessage) -> bytes:
    return msg.as_bytes(policy=email.policy.SMTP)


def clean_mail() -> bytes:
    msg = _new("clean")
    msg.set_content(TEXT)
    msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="report.pdf")
    return _wire(msg)


def dangerous_mail() -> bytes:
    """A text, an executable named like a PDF (2 MiB: a body of many packets), a PDF."""
    msg = _new("dangerous")
    msg.set_content(TEXT)
    msg.add_attachment(
        EXE, maintype="application", subtype="octet-stream", filename="invoice.pdf.exe"
    )
    msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="report.pdf")
    return _wire(msg)


def forwarded_mail() -> bytes:
    """A script inside an attached message."""
    inner = _new("inner")
    inner.set_content("see attached\n")
    inner.add_attachment(b"MsgBox 1\r\n", maintype="text", subtype="vbscript", filename="run.vbs")
    msg = _new("forwarded")
    msg.set_content(TEXT)
    msg.add_attachment(inner)
    return _wire(msg)


def single_part_mail() -> bytes:
    """A message that is an executable itself (its Content-Type written in lower case),
    with an X-Attachment-Filter header of the sender's."""
    return (
        b"From: Alice <sender@example.test>\r\n"
        b"Subject: tool\r\n"
        b"X-Attachment-Filter: clean\r\n"
        b"MIME-Version: 1.0\r\n"
        b"content-type: application/x-msdownload; name=tool.exe\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment; filename=tool.exe\r\n"
        b"\r\n" + base64.encodebytes(EXE[:4096]).replace(b"\n", b"\r\n")
    )


def parse(data: bytes) -> EmailMessage:
    return BytesParser(EmailMessage, policy=email.policy.default).parsebytes(data)


def part(msg: EmailMessage, *path: int) -> EmailMessage:
    """The part at ``path`` (payload indexes; an attached message is one level)."""
    for index in path:
        child = msg.get_payload(index)
        assert isinstance(child, EmailMessage), child
        msg = child
    return msg


def raw_parts(data: bytes) -> list[bytes]:
    """The top-level parts of a multipart message as raw bytes."""
    boundary = parse(data).get_boundary()
    assert boundary is not None
    body = data.partition(b"\r\n\r\n")[2]
    delimiter = rb"(?:^|\r\n)--" + re.escape(boundary.encode()) + rb"(?:--)?\r\n"
    return re.split(delimiter, body)[1:-1]


def with_header(data: bytes, value: bytes) -> bytes:
    """``data`` as it must arrive: X-Attachment-Filter appended to its header fields."""
    head, _, body = data.partition(b"\r\n\r\n")
    return head + b"\r\n" + HEADER + b": " + value + b"\r\n\r\n" + body


def check_renamed(sent: bytes, delivered: bytes) -> None:
    """``dangerous_mail()`` with its executable renamed, all else as it was."""
    before, after = raw_parts(sent), raw_parts(delivered)
    assert after[0] == before[0] and after[2] == before[2]  # the text and the PDF, untouched
    renamed = after[1]
    assert b'filename="invoice.pdf.exe.blocked"' in renamed
    assert part(parse(delivered), 1).get_content() == EXE
    # The top-level header fields (the boundary and all) are kept.
    head = with_header(sent, b"renamed 1 (invoice.pdf.exe)").partition(b"\r\n\r\n")[0]
    assert delivered.partition(b"\r\n\r\n")[0] == head


def check_single_part_renamed(delivered: bytes) -> None:
    msg = parse(delivered)
    assert msg.get_all("Content-Type") == ['application/octet-stream; name="tool.exe.blocked"']
    assert msg.get_all("Content-Disposition") == ['attachment; filename="tool.exe.blocked"']
    assert msg.get_content() == EXE[:4096]
    assert msg.get_all(HEADER.decode()) == ["renamed 1 (tool.exe)"]  # the sender's is gone


def check_stripped(sent: bytes, delivered: bytes) -> None:
    """``forwarded_mail()`` with the script in the attached message replaced by a notice."""
    assert raw_parts(delivered)[0] == raw_parts(sent)[0]
    attached = part(parse(delivered), 1, 0)
    text, notice = part(attached, 0), part(attached, 1)
    assert text.get_content() == "see attached\r\n"  # CRLF, as sent
    assert notice.get_content_type() == "text/plain" and notice.get_filename() is None
    assert "run.vbs (text/vbscript) was removed" in notice.get_content()
    assert b"MsgBox" not in delivered
    assert parse(delivered)[HEADER.decode()] == "removed 1 (run.vbs)"


def check_single_part_stripped(delivered: bytes) -> None:
    msg = parse(delivered)
    assert msg.get_all("Content-Type") == ['text/plain; charset="utf-8"']
    assert msg.get_all("Content-Transfer-Encoding") == ["7bit"]
    assert msg.get_all("Content-Disposition") is None
    assert msg.get_content().startswith("The attachment tool.exe (application/x-msdownload)")
    assert msg["Subject"] == "tool"
    assert msg.get_all(HEADER.decode()) == ["removed 1 (tool.exe)"]
