"""examples/attachment_filter.py, in memory with triomilter.testing.

Messages are raw MIME as a mail client writes it (CRLF, real boundaries,
base64 attachments). `mta_view` splits one into what the MTA sends the milter;
`deliver` applies the milter's changes the way the MTA does, so that the
delivered message can be parsed back and checked whole: its structure, the
changed parts, and the untouched ones byte for byte.
"""

from __future__ import annotations

import base64
import contextlib
import email.policy
import os
import re
from collections.abc import Iterator
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from triomilter import Actions, Milter, ProtocolOpts, Status
from triomilter.testing import (
    POSTFIX_OPTS,
    AddHeader,
    EomReply,
    MilterClient,
    ReplaceBody,
    ReplaceHeader,
    open_in_memory,
)

from ._load import load_example

attachment_filter = load_example("attachment_filter")

HEADER = "X-Attachment-Filter"
EXE = b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff\x00\x00" * 64  # looks like a PE file
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj << /Type /Catalog >> endobj\n" * 20
# An MTA that waits for every header and body chunk (no NOREPLY): a test
# knows that the milter has stored what it was sent.
WAITING_MTA = POSTFIX_OPTS & ~(
    ProtocolOpts.NOREPLY_HEADER | ProtocolOpts.NOREPLY_EOH | ProtocolOpts.NOREPLY_BODY
)


# --- building messages ------------------------------------------------------------------------


def b64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def text_part(text: bytes = b"Hello,\r\n\r\nplease find the documents attached.\r\n") -> bytes:
    head = b'Content-Type: text/plain; charset="utf-8"\r\nContent-Transfer-Encoding: 8bit\r\n'
    return head + b"\r\n" + text


def attachment(
    name: bytes, data: bytes = EXE, ctype: bytes = b"application/octet-stream", *, raw: bool = False
) -> bytes:
    """A base64 attachment; ``name`` is a quoted file name, or raw parameter text."""
    param = name if raw else b'"' + name + b'"'
    return (
        b"Content-Type: " + ctype + b"; name=" + param + b"\r\n"
        b"Content-Disposition: attachment; filename=" + param + b"\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + b64(data)
    )


def multipart(boundary: bytes, *parts: bytes, subtype: bytes = b"mixed") -> bytes:
    """A multipart entity (its Content-Type header first, then the body)."""
    return (
        b"Content-Type: multipart/" + subtype + b';\r\n\tboundary="' + boundary + b'"\r\n\r\n'
        b"This is a multi-part message in MIME format.\r\n"
        + b"".join(b"--" + boundary + b"\r\n" + part + b"\r\n" for part in parts)
        + b"--"
        + boundary
        + b"--\r\n"
    )


def message(entity: bytes, extra: bytes = b"") -> bytes:
    """A whole message: the usual header fields, then ``entity`` (its MIME headers and body)."""
    return (
        b"From: Alice <alice@example.org>\r\n"
        b"To: Bob <bob@example.net>\r\n"
        b"Subject: the documents\r\n"
        b"Date: Thu, 04 Dec 2025 10:00:00 +0000\r\n"
        b"Message-ID: <1234@example.org>\r\n" + extra + b"MIME-Version: 1.0\r\n" + entity
    )


def mta_view(raw: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The header fields as the MTA sends them (no space after the colon, folds as bare
    LF) and the body."""
    head, _, body = raw.partition(b"\r\n\r\n")
    fields: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            name, value = fields[-1]
            fields[-1] = (name, value + b"\n" + line)
        else:
            name, _, value = line.partition(b":")
            fields.append((name, value.removeprefix(b" ")))
    return fields, body


def deliver(raw: bytes, result: EomReply) -> bytes:
    """``raw`` with the milter's changes applied, like the MTA applies them."""
    fields, body = mta_view(raw)
    for change in result.modifications:
        match change:
            case ReplaceBody(new_body):
                body = new_body
            case AddHeader(name, value):
                fields.append((name.encode(), value.encode("utf-8", "surrogateescape")))
            case ReplaceHeader(name, index, value):
                where = [i for i, (n, _) in enumerate(fields) if n.lower() == name.lower().encode()]
                assert index <= len(where), (change, fields)
                if value is None:
                    del fields[where[index - 1]]
                else:
                    fields[where[index - 1]] = (name.encode(), value.encode("utf-8"))
            case _:
                raise AssertionError(f"unexpected change {change!r}")
    head = b"".join(
        name + b": " + value.replace(b"\n", b"\r\n") + b"\r\n" for name, value in fields
    )
    return head + b"\r\n" + body


def parse(raw: bytes) -> EmailMessage:
    return BytesParser(EmailMessage, policy=email.policy.default).parsebytes(raw)


def raw_parts(body: bytes, boundary: bytes) -> list[bytes]:
    """The parts of a multipart body as raw bytes, between its delimiter lines."""
    delimiter = rb"(?:^|\r\n)--" + re.escape(boundary) + rb"(?:--)?\r\n"
    return re.split(delimiter, body)[1:-1]


def leaves(entity: EmailMessage) -> list[EmailMessage]:
    return [part for part in entity.walk() if not part.is_multipart()]


async def send(client: MilterClient, raw: bytes) -> EomReply:
    fields, body = mta_view(raw)
    return await client.send_message("<alice@example.org>", "<bob@example.net>", fields, body)


@pytest.fixture
def milter() -> Milter:
    return attachment_filter.milter  # type: ignore[no-any-return]


@pytest.fixture
def strip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(attachment_filter, "ACTION", "strip")


@attrs.define
class Spooling:
    """The milter, spooling to a directory of the test's after 64 KiB in memory, and
    every spool it made. Holding them here keeps Python from closing a spool the
    milter forgot when the framework drops it: only the milter's own close counts."""

    directory: Path
    spools: list[Any] = attrs.field(factory=list)

    @property
    def milter(self) -> Milter:
        def recorded() -> object:
            spool = attachment_filter.Spool()
            self.spools.append(spool)
            return spool

        return attrs.evolve(attachment_filter.milter, message_data=recorded)

    def open_files(self) -> list[str]:
        """Our open files in the directory (spools are unlinked at once: only
        /proc/self/fd still sees them)."""
        found = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):  # the directory's own fd is gone already
                target = os.readlink(f"/proc/self/fd/{fd}")
                if target.startswith(f"{self.directory}/"):
                    found.append(target)
        return found


@pytest.fixture
def spooling(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Spooling]:
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to see the spool files")
    monkeypatch.setattr(attachment_filter, "SPOOL_DIR", str(tmp_path))
    monkeypatch.setattr(attachment_filter, "SPOOL_IN_MEMORY", 64 * 1024)
    spooling = Spooling(tmp_path)
    yield spooling
    assert spooling.open_files() == []
    assert all(spool.file.closed for spool in spooling.spools)


# --- clean messages -----------------------------------------------------------------------------


async def test_negotiates_what_it_uses(milter_client: MilterClient) -> None:
    assert milter_client.negotiated_actions == (
        Actions.ADD_HEADER | Actions.REPLACE_HEADER | Actions.REPLACE_BODY
    )
    opts = milter_client.negotiated_opts
    # Headers and body are only collected: the MTA does not wait for replies.
    assert opts & ProtocolOpts.NOREPLY_HEADER and opts & ProtocolOpts.NOREPLY_BODY
    assert opts & ProtocolOpts.NO_CONNECT and opts & ProtocolOpts.NO_RCPT


async def test_a_clean_message_is_only_tagged(milter_client: MilterClient) -> None:
    raw = message(multipart(b"b1", text_part(), attachment(b"report.pdf", PDF, b"application/pdf")))
    result = await send(milter_client, raw)
    assert result.status is Status.CONTINUE
    assert result.modifications == [AddHeader(HEADER, "clean")]
    assert not result.has_replaced_body()


async def test_a_plain_text_message(milter_client: MilterClient) -> None:
    result = await milter_client.send_message("<a@b>", "<c@d>", {"Subject": "hi"}, b"Hi!\r\n")
    assert result.modifications == [AddHeader(HEADER, "clean")]


@pytest.mark.parametrize(
    "name", [b"setup.exe.txt", b"exe", b"notes.execution", b"archive.tar.gz", b"readme"]
)
async def test_harmless_names(milter_client: MilterClient, name: bytes) -> None:
    raw = message(multipart(b"b1", text_part(), attachment(name, b"data")))
    assert (await send(milter_client, raw)).modifications == [AddHeader(HEADER, "clean")]


# --- renamed or stripped ------------------------------------------------------------------------


async def test_renames_a_dangerous_attachment(milter_client: MilterClient) -> None:
    parts = [
        text_part(),
        attachment(b"invoice.pdf.exe"),
        attachment(b"report.pdf", PDF, b"application/pdf"),
    ]
    raw = message(multipart(b"=_b1", *parts))
    result = await send(milter_client, raw)
    assert result.status is Status.CONTINUE
    # The top-level Content-Type (and its boundary) stays: only the body changes.
    assert [type(change) for change in result.modifications] == [ReplaceBody, AddHeader]
    assert result.has_added_header(HEADER, "renamed 1 (invoice.pdf.exe)")

    delivered = deliver(raw, result)
    new_parts = raw_parts(mta_view(delivered)[1], b"=_b1")
    assert len(new_parts) == 3
    assert new_parts[0] == parts[0] and new_parts[2] == parts[2]  # untouched: byte for byte
    renamed = leaves(parse(delivered))[1]
    assert renamed.get_content_type() == "application/octet-stream"
    assert renamed.get_filename() == "invoice.pdf.exe.blocked"
    assert renamed.get_param("name") == "invoice.pdf.exe.blocked"
    assert renamed.get_content_disposition() == "attachment"
    assert renamed.get_content() == EXE  # the content itself is kept


async def test_strips_a_dangerous_attachment(milter_client: MilterClient, strip: None) -> None:
    parts = [text_part(), attachment(b"run.js", b"WScript.Echo(1)", b"text/javascript")]
    raw = message(multipart(b"b1", *parts))
    result = await send(milter_client, raw)
    assert result.has_added_header(HEADER, "removed 1 (run.js)")

    delivered = deliver(raw, result)
    new_parts = raw_parts(mta_view(delivered)[1], b"b1")
    assert new_parts[0] == parts[0]
    notice = leaves(parse(delivered))[1]
    assert notice.get_content_type() == "text/plain"
    assert notice.get_filename() is None and notice.get_content_disposition() is None
    assert "run.js (text/javascript) was removed" in notice.get_content()
    assert "MIME-Version" not in notice  # only the top level has one
    assert b"WScript" not in delivered


@pytest.mark.parametrize("action", ["rename", "strip"])
async def test_several_attachments(
    milter_client: MilterClient, monkeypatch: pytest.MonkeyPatch, action: str
) -> None:
    monkeypatch.setattr(attachment_filter, "ACTION", action)
    raw = message(
        multipart(
            b"b1",
            text_part(),
            attachment(b"a.SCR"),  # case does not matter
            attachment(b"ok.pdf", PDF, b"application/pdf"),
            attachment(b"payload", EXE, b"application/x-msdownload"),  # by its type
            attachment(b"tool.exe. . ."),  # Windows ignores trailing dots and spaces
        )
    )
    result = await send(milter_client, raw)
    verb = "renamed" if action == "rename" else "removed"
    assert result.has_added_header(HEADER, f"{verb} 3 (a.SCR, payload, tool.exe. . .)")
    kept = [part.get_filename() for part in leaves(parse(deliver(raw, result)))]
    if action == "rename":
        assert kept == [None, "a.SCR.blocked", "ok.pdf", "payload.blocked", "tool.exe. . ..blocked"]
    else:
        assert kept == [None, None, "ok.pdf", None, None]


async def test_many_names_are_listed_briefly(milter_client: MilterClient) -> None:
    parts = [attachment(b"file%d.exe" % n) for n in range(12)]
    result = await send(milter_client, message(multipart(b"b1", text_part(), *parts)))
    assert result.has_added_header(
        HEADER, "renamed 12 (file0.exe, file1.exe, file2.exe, file3.exe, file4.exe, ...)"
    )


async def test_nested_multiparts(milter_client: MilterClient, strip: None) -> None:
    alternative = multipart(
        b"alt",
        text_part(),
        b"Content-Type: text/html\r\n\r\n<p>Hello</p>\r\n",
        subtype=b"alternative",
    )
    inner = multipart(b"inner", attachment(b"deep.vbs", b"MsgBox 1"), text_part(b"inner\r\n"))
    raw = message(multipart(b"outer", alternative, inner))
    result = await send(milter_client, raw)
    assert result.has_added_header(HEADER, "removed 1 (deep.vbs)")
    delivered = deliver(raw, result)
    outer = raw_parts(mta_view(delivered)[1], b"outer")
    assert outer[0] == alternative  # the untouched branch, byte for byte
    types = [part.get_content_type() for part in parse(delivered).walk()]
    assert types == [
        "multipart/mixed",
        "multipart/alternative",
        "text/plain",
        "text/html",
        "multipart/mixed",
        "text/plain",  # the notice, where deep.vbs was
        "text/plain",
    ]


async def test_inside_an_attached_message(milter_client: MilterClient) -> None:
    forwarded = (
        b"From: Carol <carol@example.com>\r\nSubject: fwd\r\nMIME-Version: 1.0\r\n"
        + multipart(b"fwd", text_part(b"see attached\r\n"), attachment(b"photo.jpg.lnk"))
    )
    raw = message(
        multipart(b"b1", text_part(), b"Content-Type: message/rfc822\r\n\r\n" + forwarded)
    )
    result = await send(milter_client, raw)
    assert result.has_added_header(HEADER, "renamed 1 (photo.jpg.lnk)")
    attached = parse(deliver(raw, result)).get_payload(1)
    assert isinstance(attached, EmailMessage)
    inner = attached.get_payload(0)
    assert isinstance(inner, EmailMessage) and inner["Subject"] == "fwd"
    assert [part.get_filename() for part in leaves(inner)] == [None, "photo.jpg.lnk.blocked"]


@pytest.mark.parametrize(
    ("param", "name"),
    [
        # RFC 2231: UTF-8, percent-encoded, in continuations
        (b"*0*=utf-8''f%C3%A4ktura%20; filename*1*=2025.pdf.exe", "f\xe4ktura 2025.pdf.exe"),
        # RFC 2047 in a quoted parameter (not standard; Outlook writes it)
        (b'="=?utf-8?b?w7xiZXJ3ZWlzdW5nLmV4ZQ==?="', "\xfcberweisung.exe"),
        # raw UTF-8 (RFC 6532)
        ('="r\xe9sum\xe9.pif"'.encode(), "r\xe9sum\xe9.pif"),
        # a right-to-left override shows "invoice_exe.pdf"; the part before a NUL counts
        (b"*=utf-8''invoice_%E2%80%AEfdp.exe", "invoice_?fdp.exe"),
        (b'="setup.exe\x00.txt"', "setup.exe?.txt"),
    ],
    ids=["rfc2231", "rfc2047", "8bit", "rtl-override", "nul"],
)
async def test_encoded_file_names(milter_client: MilterClient, param: bytes, name: str) -> None:
    part = (
        b"Content-Type: application/octet-stream\r\n"
        b"Content-Disposition: attachment;\r\n filename" + param + b"\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + b64(EXE)
    )
    raw = message(multipart(b"b1", text_part(), part))
    result = await send(milter_client, raw)
    # The header is ASCII (other text escaped), one line, whatever the name.
    escaped = name.encode("ascii", "backslashreplace").decode()
    assert result.has_added_header(HEADER, f"renamed 1 ({escaped})")
    renamed = leaves(parse(deliver(raw, result)))[1]
    assert renamed.get_filename() == name + ".blocked"


async def test_a_name_the_email_package_reads_differently(milter_client: MilterClient) -> None:
    # Unquoted with a space: "my" to Python's email package, "my file.exe" to
    # other mail readers. The raw parameter text is checked too.
    raw = message(multipart(b"b1", text_part(), attachment(b"my file.exe", raw=True)))
    result = await send(milter_client, raw)
    assert result.has_added_header(HEADER, "renamed 1 (my file.exe)")
    renamed = leaves(parse(deliver(raw, result)))[1]
    assert renamed.get_filename() == "my file.exe.blocked"
    assert re.search(rb'filename="my file.exe.blocked"', deliver(raw, result))


async def test_a_second_content_disposition_is_no_way_around(milter_client: MilterClient) -> None:
    part = (
        b"Content-Type: application/octet-stream\r\n"
        b"Content-Disposition: attachment; filename=harmless.txt\r\n"
        b"Content-Disposition: attachment; filename=evil.bat\r\n\r\n@echo off\r\n"
    )
    raw = message(multipart(b"b1", text_part(), part))
    result = await send(milter_client, raw)
    assert result.has_added_header(HEADER, "renamed 1 (evil.bat)")
    renamed = leaves(parse(deliver(raw, result)))[1]
    assert renamed.get_all("Content-Disposition") == ['attachment; filename="evil.bat.blocked"']


async def test_names_are_made_safe_for_a_header(milter_client: MilterClient) -> None:
    evil = b"*=utf-8''a%0D%0AX-Injected:%20yes%09" + b"x" * 300 + b".exe"
    part = (
        b"Content-Type: application/octet-stream\r\nContent-Disposition: attachment; filename"
        + evil
        + b"\r\n\r\nMZ\r\n"
    )
    raw = message(multipart(b"b1", text_part(), part))
    result = await send(milter_client, raw)
    (added,) = [change for change in result.modifications if isinstance(change, AddHeader)]
    assert added.value == "renamed 1 (a??X-Injected: yes?" + "x" * 21 + "..." + "x" * 13 + ".exe)"
    delivered = parse(deliver(raw, result))
    assert "X-Injected" not in delivered
    assert leaves(delivered)[1].get_filename() == added.value[11:-1] + ".blocked"


async def test_8bit_headers_and_text(milter_client: MilterClient) -> None:
    text = text_part("Grüße, the files — all of them.\r\n".encode())
    raw = message(
        multipart(b"b1", text, attachment(b"data.bin", b"\x00\x01"), attachment(b"x.cmd")),
        extra="X-Greeting: Grüße\r\n".encode() + b"X-Legacy: caf\xe9\r\n",  # UTF-8, Latin-1
    )
    result = await send(milter_client, raw)
    assert result.has_added_header(HEADER, "renamed 1 (x.cmd)")
    delivered = deliver(raw, result)
    head = raw.partition(b"\r\n\r\n")[0]
    assert (
        delivered.partition(b"\r\n\r\n")[0] == head + b"\r\nX-Attachment-Filter: renamed 1 (x.cmd)"
    )
    assert raw_parts(mta_view(delivered)[1], b"b1")[:2] == raw_parts(mta_view(raw)[1], b"b1")[:2]


# --- a message that is itself the attachment: headers and body change together -----------------


SINGLE = (
    b"From: Alice <alice@example.org>\r\n"
    b"Subject: tool\r\n"
    b"content-type: application/x-msdownload;\r\n name=tool.exe\r\n"  # the case varies
    b"Content-Transfer-Encoding: base64\r\n"
    b"Content-Disposition: attachment; filename=tool.exe\r\n"
    b"\r\n" + b64(EXE)
)


async def test_a_single_part_message_renamed(milter_client: MilterClient) -> None:
    result = await send(milter_client, SINGLE)
    # No body replacement: the content stays, its headers change, and MIME-Version
    # (missing before) is added since there now is a MIME header to vouch for.
    assert result.modifications == [
        ReplaceHeader("Content-Type", 1, 'application/octet-stream; name="tool.exe.blocked"'),
        ReplaceHeader("Content-Disposition", 1, 'attachment; filename="tool.exe.blocked"'),
        AddHeader("MIME-Version", "1.0"),
        AddHeader(HEADER, "renamed 1 (tool.exe)"),
    ]
    delivered = parse(deliver(SINGLE, result))
    assert delivered.get_filename() == "tool.exe.blocked"
    assert delivered.get_content() == EXE


async def test_a_single_part_message_stripped(milter_client: MilterClient, strip: None) -> None:
    result = await send(milter_client, SINGLE)
    assert result.modifications[1:] == [
        ReplaceHeader("Content-Type", 1, 'text/plain; charset="utf-8"'),
        ReplaceHeader("Content-Transfer-Encoding", 1, "7bit"),
        ReplaceHeader("Content-Disposition", 1, None),
        AddHeader("MIME-Version", "1.0"),
        AddHeader(HEADER, "removed 1 (tool.exe)"),
    ]
    delivered = parse(deliver(SINGLE, result))
    assert delivered.get_content_type() == "text/plain"
    assert delivered.get_content().startswith(
        "The attachment tool.exe (application/x-msdownload) was removed"
    )
    assert delivered["Subject"] == "tool"


async def test_the_senders_own_filter_header_is_removed(milter_client: MilterClient) -> None:
    raw = message(
        multipart(b"b1", text_part(), attachment(b"x.hta")),
        extra=b"X-Attachment-Filter: clean\r\nx-attachment-filter: clean, really\r\n",
    )
    result = await send(milter_client, raw)
    assert result.modifications[1:] == [
        ReplaceHeader(HEADER, 2, None),
        ReplaceHeader(HEADER, 1, None),
        AddHeader(HEADER, "renamed 1 (x.hta)"),
    ]


# --- the spool: bounded memory, nothing left behind ---------------------------------------------


async def test_a_large_message_is_spooled_to_disk(spooling: Spooling) -> None:
    big = b"A" * 3 * 1024 * 1024
    raw = message(multipart(b"b1", text_part(), attachment(b"big.iso", big), text_part(b"end\r\n")))
    fields, body = mta_view(raw)
    async with open_in_memory(spooling.milter, opts=WAITING_MTA) as client:
        await client.mail("<alice@example.org>")
        await client.rcpt("<bob@example.net>")
        for name, value in fields:
            await client.header(name, value)
        await client.eoh()
        assert spooling.open_files() == []  # the headers fit in memory
        await client.body(body)
        (spooled,) = spooling.open_files()  # past 64 KiB: on disk
        assert spooled.endswith(" (deleted)")  # and without a name from the start
        result = await client.eom()
        assert spooling.open_files() == []  # closed with the message
        assert [spool.file.closed for spool in spooling.spools] == [True]
    assert result.has_added_header(HEADER, "renamed 1 (big.iso)")
    assert leaves(parse(deliver(raw, result)))[1].get_content() == big


async def start_message(client: MilterClient, body: bytes) -> None:
    await client.mail("<alice@example.org>")
    await client.rcpt("<bob@example.net>")
    await client.header("Subject", "big")
    await client.eoh()
    await client.body(body)


async def test_an_aborted_message_leaves_nothing(spooling: Spooling) -> None:
    async with open_in_memory(spooling.milter, opts=WAITING_MTA) as client:
        await start_message(client, b"x" * 200_000)
        assert len(spooling.open_files()) == 1
        await client.abort()  # RSET: no reply to wait for
        await trio.testing.wait_all_tasks_blocked()  # the milter has read it
        assert spooling.open_files() == []
        # The next message of the connection has a spool of its own.
        result = await send(client, message(multipart(b"b1", text_part(), attachment(b"a.exe"))))
        assert result.has_added_header(HEADER, "renamed 1 (a.exe)")
    assert len(spooling.spools) == 2


async def test_a_quit_mid_message_leaves_nothing(spooling: Spooling) -> None:
    async with open_in_memory(spooling.milter, opts=WAITING_MTA) as client:
        await start_message(client, b"x" * 200_000)
        assert len(spooling.open_files()) == 1
        # Leaving the block: QUIT mid-message (the milter aborts, then closes),
        # and the block waits until the milter has finished the connection.
    assert spooling.open_files() == []


@pytest.mark.parametrize("oversized", ["pass", "reject"])
async def test_a_message_over_the_cap(
    spooling: Spooling, monkeypatch: pytest.MonkeyPatch, oversized: str
) -> None:
    monkeypatch.setattr(attachment_filter, "MAX_MESSAGE", 500_000)
    monkeypatch.setattr(attachment_filter, "OVERSIZED", oversized)
    raw = message(multipart(b"b1", text_part(), attachment(b"big.exe", EXE * 1000)))
    fields, body = mta_view(raw)
    async with open_in_memory(spooling.milter, opts=WAITING_MTA) as client:
        await client.mail("<alice@example.org>")
        await client.rcpt("<bob@example.net>")
        for name, value in fields:
            await client.header(name, value)
        await client.eoh()
        await client.body(body[:300_000])
        assert len(spooling.open_files()) == 1
        await client.body(body[300_000:])
        assert spooling.open_files() == []  # dropped as soon as the cap was passed
        result = await client.eom()
    if oversized == "pass":
        assert result.status is Status.CONTINUE
        assert result.modifications == [AddHeader(HEADER, "not checked (over 500000 bytes)")]
    else:
        assert (result.status, result.modifications) == (Status.REJECT, [])
        assert result.text == (
            "552 5.3.4 Message too large to be checked for attachments (500000 bytes at most)"
        )


async def test_a_spool_that_cannot_be_written_is_a_tempfail(
    spooling: Spooling, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A directory that does not exist fails like a full disk: when the spool
    # goes to disk. The message must not be checked (nor passed) half-read.
    monkeypatch.setattr(attachment_filter, "SPOOL_DIR", str(spooling.directory / "missing"))
    raw = message(multipart(b"b1", text_part(), attachment(b"big.exe", EXE * 200)))
    async with open_in_memory(spooling.milter) as client:
        result = await send(client, raw)
        assert (result.status, result.modifications) == (Status.TEMPFAIL, [])
        # Only that message: the next one is checked as usual.
        result = await send(client, message(multipart(b"b1", text_part(), attachment(b"a.exe"))))
        assert result.has_added_header(HEADER, "renamed 1 (a.exe)")


# --- malformed MIME: never a panic, the milter goes on ------------------------------------------


MALFORMED = {
    "no end boundary": (
        message(multipart(b"b1", text_part(), attachment(b"x.exe"))[:-8]),
        "renamed 1 (x.exe)",
    ),
    "no boundary parameter": (
        message(b"Content-Type: multipart/mixed\r\n\r\n--b1\r\n" + attachment(b"x.exe")),
        "clean",  # no part to any reader: one text
    ),
    "boundary never used": (
        message(
            b'Content-Type: multipart/mixed; boundary="zz"\r\n\r\n--b1\r\n' + attachment(b"x.exe")
        ),
        "clean",
    ),
    "garbage parameters": (
        message(b'Content-Type: ;;;="\r\nContent-Disposition: =;filename\r\n\r\nx\r\n'),
        "clean",
    ),
    "bad base64": (
        message(multipart(b"b1", b"Content-Transfer-Encoding: base64\r\n\r\n!!not base64==\r\n")),
        "clean",
    ),
    "unknown charset": (
        message(multipart(b"b1", b"Content-Type: text/plain; charset=x-what\r\n\r\n\xff\xfe\r\n")),
        "clean",
    ),
    "no body": (message(b"Content-Type: multipart/mixed; boundary=b1\r\n"), "clean"),
    "binary junk": (
        message(b"Content-Type: multipart/mixed; boundary=b1\r\n\r\n" + bytes(range(256))),
        "clean",
    ),
    "broken attached message": (
        message(
            multipart(b"b1", b"Content-Type: message/rfc822\r\n\r\n" + attachment(b"x.exe")[:60])
        ),
        "renamed 1 (x.exe)",
    ),
}


@pytest.mark.parametrize(("raw", "summary"), list(MALFORMED.values()), ids=list(MALFORMED))
async def test_malformed_mime(milter_client: MilterClient, raw: bytes, summary: str) -> None:
    result = await send(milter_client, raw)
    assert result.status is Status.CONTINUE
    assert result.has_added_header(HEADER, summary)
    parse(deliver(raw, result))  # still a message
    await milter_client.abort()
    after = await send(milter_client, message(multipart(b"b1", attachment(b"a.exe"))))
    assert after.has_added_header(HEADER, "renamed 1 (a.exe)")


def nested(depth: int) -> bytes:
    entity = attachment(b"deep.exe")
    for level in range(depth):
        entity = multipart(b"n%d" % level, entity)
    return message(entity)


@pytest.mark.parametrize("depth", [60, 1000])
async def test_nested_too_deeply(milter_client: MilterClient, depth: int) -> None:
    # 60: refused by the filter's own limit; 1000: the email package's recursion fails first.
    result = await send(milter_client, nested(depth))
    assert (result.status, result.text) == (
        Status.REJECT,
        "554 5.6.0 MIME parts nested too deeply to be checked",
    )
    await milter_client.abort()
    assert (await send(milter_client, nested(10))).has_added_header(HEADER, "renamed 1 (deep.exe)")


async def test_a_parser_failure_is_a_tempfail_for_that_message_only(
    milter_client: MilterClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whatever the email package may raise on hostile input (on_exception="tempfail").
    def choke(*args: object) -> None:
        raise IndexError("the email package choked")

    raw = message(multipart(b"b1", text_part(), attachment(b"a.exe")))
    with monkeypatch.context() as patched:
        patched.setattr(attachment_filter, "defang", choke)
        assert (await send(milter_client, raw)).status is Status.TEMPFAIL
    await milter_client.abort()
    assert (await send(milter_client, raw)).has_added_header(HEADER, "renamed 1 (a.exe)")


# --- the pieces ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "ext"),
    [
        ("invoice.pdf.exe", "exe"),
        ("INVOICE.EXE", "exe"),
        ("x.exe.", "exe"),
        ("x.exe . ", "exe"),
        ("gpj\u202e.exe", "exe"),
        ("x.exe\0.txt", "exe"),
        ("x.exe.txt", "txt"),
        ("noext", ""),
        (".bashrc", "bashrc"),
        ("", ""),
    ],
)
def test_extension(name: str, ext: str) -> None:
    assert attachment_filter.extension(name) == ext


def test_header_fixes() -> None:
    fix = attachment_filter.HeaderFix
    before: dict[str, list[str]] = {name: [] for name in attachment_filter.MIME_HEADERS}
    after: dict[str, list[str]] = {name: [] for name in attachment_filter.MIME_HEADERS}
    before["Content-Type"] = ["text/plain", "text/html", "image/png"]
    after["Content-Type"] = ["text/plain"]
    after["MIME-Version"] = ["1.0"]
    before["Content-Disposition"] = ["inline"]
    after["Content-Disposition"] = ["attachment;\r\n filename=x"]
    assert attachment_filter.header_fixes(before, after) == (
        fix("Content-Disposition", 1, b"attachment;\n filename=x"),  # folded as the MTA wants
        fix("Content-Type", 3, None),  # deletions from the last one up
        fix("Content-Type", 2, None),
        fix("MIME-Version", 0, b"1.0"),  # additions last
    )
