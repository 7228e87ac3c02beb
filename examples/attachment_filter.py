"""An attachment filter: renames or strips dangerous attachments (programs and scripts).

Like MIMEDefang's "defang" or amavis' banned files: every part of the message,
inside nested multiparts and attached messages (``message/rfc822``) too, whose
file name ends in a dangerous extension (``invoice.pdf.exe``, ``run.js``: see
``DANGEROUS_EXTENSIONS``) or whose content type is a program's
(``DANGEROUS_TYPES``) is

- renamed, with ``ACTION = "rename"`` (the default): ``invoice.pdf.exe``
  becomes ``invoice.pdf.exe.blocked``, typed ``application/octet-stream``, the
  content kept;
- or stripped, with ``ACTION = "strip"``: replaced by a short ``text/plain``
  part saying what was removed.

The message then gets ``X-Attachment-Filter: renamed 1 (invoice.pdf.exe)`` (or
``removed ...``). A message without dangerous parts is left as it is, but for
``X-Attachment-Filter: clean``. Such headers from the sender are removed first.

Run it:   triomilter serve examples/attachment_filter.py --socket inet:8897@127.0.0.1
Postfix:  smtpd_milters = inet:127.0.0.1:8897
          milter_default_action = tempfail
          message_size_limit = 10240000   (at most MAX_MESSAGE: see "Size cap")
The MTA must grant ADD_HEADER, REPLACE_HEADER and REPLACE_BODY (Postfix and
Sendmail offer all three); an MTA that does not offer them is refused at negotiation.

How it works, and why:

- **Spooling.** Header fields and body chunks go to a
  ``tempfile.SpooledTemporaryFile`` per message (``Milter(message_data=Spool)``):
  in memory up to ``SPOOL_IN_MEMORY`` bytes, then in an anonymous file in
  ``SPOOL_DIR`` (unlinked when made: no name is ever left behind). ``Spool``
  is a context manager, so the framework closes it however the message ends
  (end of message, a decision, an abort, a hang-up, a shutdown): no handler
  has to catch every path.
  A failing spool (disk full) makes the message TEMPFAIL at its end: parsing
  the part that was stored could only drop the rest.
- **Size cap.** Past ``MAX_MESSAGE`` bytes the spool is dropped at once and
  the rest is not stored. The message then passes unchecked, with
  ``X-Attachment-Filter: not checked (over N bytes)``, or is refused
  (552 5.3.4) with ``OVERSIZED = "reject"``. Never TEMPFAIL: the size is the
  same on every retry, so the sender would resend it for days, then bounce it.
  With ``MAX_MESSAGE`` at or above the MTA's ``message_size_limit`` the cap
  is only a safety net.
- **Parsing** is the standard ``email`` package (``policy.default``: RFC 2231
  and RFC 2047 file names), in a worker thread so that other connections go
  on meanwhile, at most ``PARSERS`` at a time (a parse holds its message in
  memory a few times over). Names are judged as the ``email`` package reads
  them, and also as other mail readers may (the raw ``filename=``/``name=``
  text, e.g. an unquoted ``filename=my file.exe``, which the ``email`` package
  reads as "my"). Parts nested deeper than ``MAX_DEPTH`` (it recurses per
  level) are refused, 554 5.6.0. Anything else the package raises on hostile
  input is, with ``on_exception="tempfail"``, a logged TEMPFAIL for that
  message only: the milter goes on.
- **The new body keeps the headers right.** Only when something changed is
  the message written out again (``BytesGenerator``, CRLF like the MTA's body
  chunks; the parts left alone come out byte for byte) and sent with
  ``append_body_chunk``. A multipart message keeps its top-level
  ``Content-Type`` and with it the boundary, which the new body reuses. When
  the message itself is the dangerous part (a single-part message), its
  top-level MIME headers change too: each one that differs afterwards is
  replaced, added or deleted (``MIME-Version`` added if missing), and the body
  is sent only if its bytes changed (a rename changes headers only).

Not covered (a production filter would): archives are not looked into, and a
malformed MIME structure is taken as the ``email`` package reads it.
"""

from __future__ import annotations

import email.policy
import re
import tempfile
from collections.abc import Iterator
from email.generator import BytesGenerator
from email.message import EmailMessage, MIMEPart
from email.parser import BytesParser
from io import BytesIO
from typing import Literal
from urllib.parse import unquote

import attrs
import trio

from triomilter import (
    Actions,
    Context,
    Err,
    Milter,
    Ok,
    Result,
    Status,
    on_body,
    on_eoh,
    on_eom,
    on_header,
)

# --- settings ---------------------------------------------------------------------------------

ACTION: Literal["rename", "strip"] = "rename"
DANGEROUS_EXTENSIONS = frozenset(
    {"ade", "adp", "app", "appx", "bas", "bat", "cab", "chm", "cmd", "com", "cpl", "dll", "exe"}
    | {"hta", "img", "inf", "ins", "iso", "isp", "jar", "js", "jse", "lnk", "mde", "msc", "msi"}
    | {"msix", "msp", "mst", "pif", "ps1", "psc1", "reg", "scf", "scr", "sct", "shb", "shs"}
    | {"sys", "url", "vb", "vbe", "vbs", "vhd", "vxd", "wsc", "wsf", "wsh", "xll"}
)
DANGEROUS_TYPES = frozenset(
    {
        "application/hta",
        "application/x-dosexec",
        "application/x-ms-installer",
        "application/x-ms-shortcut",
        "application/x-msdos-program",
        "application/x-msdownload",
        "application/x-msi",
    }
)
RENAMED_SUFFIX = ".blocked"
HEADER = "X-Attachment-Filter"

SPOOL_IN_MEMORY = 1024 * 1024  # bytes of a message kept in memory; the rest goes to disk
SPOOL_DIR: str | None = None  # None: $TMPDIR, else /tmp
MAX_MESSAGE = 25 * 1024 * 1024  # header and body bytes; larger messages are not checked
OVERSIZED: Literal["pass", "reject"] = "pass"
MAX_DEPTH = 50  # nested parts; the email package fails at a few hundred
PARSERS = trio.CapacityLimiter(2)  # messages parsed at the same time

MAX_NAME = 60  # characters of a file name shown in a header or notice
MAX_LISTED = 5  # file names listed in the header

# CRLF like the body chunks; headers written back as they came, not refolded.
POLICY = email.policy.default.clone(linesep="\r\n", refold_source="none")
MIME_HEADERS = ("MIME-Version", "Content-Type", "Content-Transfer-Encoding", "Content-Disposition")
MimeHeaders = dict[str, list[str]]  # header name -> its values, in order
NOTICE = (
    "The attachment {name} ({type}) was removed: files of this kind can run programs.\n"
    "Ask the sender to share it another way if you need it.\n"
)


# --- the spool: one message, in memory or on disk ---------------------------------------------


def _spool_file() -> tempfile.SpooledTemporaryFile[bytes]:
    return tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY, dir=SPOOL_DIR)


@attrs.define
class Spool:
    """One message as the MTA sends it: header fields, a blank line, the body."""

    file: tempfile.SpooledTemporaryFile[bytes] = attrs.field(factory=_spool_file)
    size: int = 0
    body_offset: int = 0
    oversized: bool = False
    error: OSError | None = None
    own_headers: int = 0  # X-Attachment-Filter headers the message came with

    def write(self, data: bytes) -> None:
        """Store ``data``, unless the cap is passed (then drop everything) or storing failed."""
        if self.file.closed:
            return
        self.size += len(data)
        if self.size > MAX_MESSAGE:
            self.oversized = True
            self.file.close()
            return
        try:
            self.file.write(data)
        except OSError as exc:
            self.error = exc
            self.file.close()

    def read(self) -> bytes:
        self.file.seek(0)
        return self.file.read()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()  # the framework's call, when the message's data is dropped


# --- the check: plain functions, no milter in sight ------------------------------------------


@attrs.frozen
class HeaderFix:
    """Replace occurrence ``index`` (1-based) of header ``name``, delete it
    (``value`` None), or, with ``index`` 0, add a new one."""

    name: str
    index: int
    value: bytes | None


@attrs.frozen
class Verdict:
    """What to do at end of message."""

    summary: str = "clean"  # the X-Attachment-Filter value
    body: bytes | None = None  # the new body; None keeps the body
    headers: tuple[HeaderFix, ...] = ()  # top-level header changes going with it
    refusal: tuple[str, str, str] | None = None  # refuse with (code, extended code, text)


class TooDeep(Exception):
    """The MIME structure is nested deeper than MAX_DEPTH."""


def check_message(data: bytes, body_offset: int) -> Verdict:
    """Rename or strip the dangerous parts of ``data`` (body from ``body_offset``)."""
    try:
        message = BytesParser(EmailMessage, policy=POLICY).parsebytes(data)
        before = mime_headers(message)
        found: list[str] = []
        defang(message, found, depth=0)
        if not found:
            return Verdict()
        after = mime_headers(message)
        if after != before and "MIME-Version" not in message:
            message["MIME-Version"] = "1.0"
            after = mime_headers(message)
        body = body_of(message)
    except (RecursionError, TooDeep):  # the email package recurses per nesting level
        return Verdict(refusal=("554", "5.6.0", "MIME parts nested too deeply to be checked"))
    verb = "removed" if ACTION == "strip" else "renamed"
    listed = ", ".join(found[:MAX_LISTED]) + (", ..." if len(found) > MAX_LISTED else "")
    return Verdict(
        summary=f"{verb} {len(found)} ({listed})",
        body=None if body == data[body_offset:] else body,
        headers=header_fixes(before, after),
    )


def defang(part: MIMEPart, found: list[str], depth: int) -> None:
    """Rename or strip (in place) the dangerous parts in ``part``; their names go to ``found``."""
    if depth > MAX_DEPTH:
        raise TooDeep
    if part.is_multipart():  # multipart/*, and message/rfc822: a list of parts
        for child in part.iter_parts():
            defang(child, found, depth + 1)
        return
    name = dangerous_name(part)
    if name is None:
        return
    found.append(name)
    if ACTION == "strip":
        text = NOTICE.format(name=name, type=part.get_content_type())
        part.clear_content()  # every Content-* header goes
        # MIMEPart's set_content, not EmailMessage's: that adds MIME-Version to every part.
        MIMEPart.set_content(part, text, cte="7bit" if text.isascii() else "quoted-printable")
    else:
        del part["Content-Type"]  # every one of them: no second opinion left
        del part["Content-Disposition"]
        new_name = name + RENAMED_SUFFIX
        part.add_header("Content-Type", "application/octet-stream", name=new_name)
        part.add_header("Content-Disposition", "attachment", filename=new_name)


def dangerous_name(part: MIMEPart) -> str | None:
    """What to call ``part`` in reports if it is dangerous (printable, bounded), else None."""
    names = list(file_names(part))
    for name in names:
        if extension(name) in DANGEROUS_EXTENSIONS:
            return printable(name)
    if part.get_content_type() in DANGEROUS_TYPES:
        return printable(names[0]) if names else "unnamed"
    return None


# The raw text of name and filename parameters (``name=``, ``filename*=``,
# ``filename*1*=``...), to check it as other mail readers may read it.
_RAW_NAME = re.compile(
    r"""\b (?:file)?name (?:\*[0-9]*)? \*? \s*=\s*
        (?:[\w.-]*'[\w-]*')?  # an RFC 2231 charset'language' prefix
        "? ([^";]*)          # the value: up to a quote or a semicolon
    """,
    re.IGNORECASE | re.VERBOSE,
)


def file_names(part: MIMEPart) -> Iterator[str]:
    """Every name a mail reader may give ``part``.

    The ``filename`` and ``name`` parameters of all its Content-Disposition and
    Content-Type headers as the ``email`` package decodes them (RFC 2231, RFC
    2047, 8-bit), then their raw text, percent-decoded, where other readers may
    see more (the email package reads an unquoted ``filename=my file.exe`` as
    "my", and an RFC 2231 name with a bad character only up to it).
    """
    for header, param in (("Content-Disposition", "filename"), ("Content-Type", "name")):
        for value in part.get_all(header, []):
            name = value.params.get(param)
            if name:
                yield as_text(name)
    for header, raw in part.raw_items():
        if header.lower() in ("content-disposition", "content-type"):
            for match in _RAW_NAME.finditer(str(raw)):
                yield as_text(unquote(match.group(1)))


def as_text(name: str) -> str:
    """``name`` with raw 8-bit bytes (which the parser keeps as surrogates) read as UTF-8."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def extension(name: str) -> str:
    """The extension Windows acts on: after the last dot, lower case.

    What a NUL cuts off, trailing dots and spaces, and invisible characters (a
    right-to-left override makes ``gpj.exe`` look like ``exe.jpg``) do not count.
    """
    visible = "".join(char for char in name.partition("\0")[0] if char.isprintable())
    _, dot, ext = visible.rstrip(". ").rpartition(".")
    return ext.lower() if dot else ""


def printable(name: str) -> str:
    """``name`` for a header or a notice: one line, no control or invisible characters,
    at most MAX_NAME characters (the end, with the extension, is kept)."""
    text = "".join(char if char.isprintable() else "?" for char in name).strip() or "unnamed"
    if len(text) <= MAX_NAME:
        return text
    return text[: MAX_NAME - 20] + "..." + text[-17:]


def mime_headers(message: MIMEPart) -> MimeHeaders:
    """The values of the top-level MIME headers, as the parser kept them or as set since."""
    values: MimeHeaders = {name: [] for name in MIME_HEADERS}
    for name, value in message.raw_items():
        for known in MIME_HEADERS:
            if name.lower() == known.lower():
                values[known].append(value)
    return values


def header_fixes(before: MimeHeaders, after: MimeHeaders) -> tuple[HeaderFix, ...]:
    """The header changes that turn ``before`` into ``after``.

    Replacements first, then deletions from the last occurrence up (a deletion
    never moves an occurrence still to be changed), then additions.
    """
    replaced = [
        HeaderFix(name, index, wire_value(name, now))
        for name in MIME_HEADERS
        for index, (was, now) in enumerate(zip(before[name], after[name], strict=False), 1)
        if was != now
    ]
    deleted = [
        HeaderFix(name, index, None)
        for name in MIME_HEADERS
        for index in range(len(before[name]), len(after[name]), -1)
    ]
    added = [
        HeaderFix(name, 0, wire_value(name, value))
        for name in MIME_HEADERS
        for value in after[name][len(before[name]) :]
    ]
    return (*replaced, *deleted, *added)


def wire_value(name: str, value: str) -> bytes:
    """A header value as the MTA takes it: folded lines joined by LF, no leading space."""
    folded = POLICY.fold(name, value)  # "Name: value\r\n more\r\n"
    value = folded[len(name) + 2 :].removesuffix("\r\n").replace("\r\n", "\n")
    return value.encode("utf-8", "surrogateescape")  # 8-bit bytes back as they came


def body_of(message: EmailMessage) -> bytes:
    """The body of ``message`` as it would now be sent: everything after its header fields."""
    out = BytesIO()
    BytesGenerator(out, mangle_from_=False, policy=POLICY).flatten(message)
    data = out.getvalue()
    if data.startswith(b"\r\n"):  # no header fields at all
        return data[2:]
    return data.partition(b"\r\n\r\n")[2]


def check_spool(spool: Spool) -> Verdict:
    """`check_message` on what ``spool`` holds (in a worker thread: it takes a while)."""
    return check_message(spool.read(), spool.body_offset)


# --- the milter -------------------------------------------------------------------------------
# on_header, on_eoh and on_body only collect: annotated -> None, the MTA does
# not wait for a reply to each of them (NOREPLY).


@on_header
async def header(ctx: Context[None, Spool], name: bytes, value: bytes) -> None:
    # The MTA sends no space after the colon and folds as a bare LF (protocol.md
    # §5.3): put them back. Bytes, not str: 8-bit headers are stored as they came.
    spool = ctx.message_data
    if name.lower() == HEADER.lower().encode():
        spool.own_headers += 1
    spool.write(name + b": " + value.replace(b"\n", b"\r\n") + b"\r\n")


@on_eoh
async def eoh(ctx: Context[None, Spool]) -> None:
    spool = ctx.message_data
    spool.write(b"\r\n")
    spool.body_offset = spool.size


@on_body
async def body(ctx: Context[None, Spool], chunk: bytes) -> None:
    ctx.message_data.write(chunk)


@on_eom
async def eom(ctx: Context[None, Spool]) -> Result[Status]:
    spool = ctx.message_data
    if spool.error is not None:
        return Err(f"spooling the message failed: {spool.error}")  # TEMPFAIL
    if spool.oversized:
        verdict = oversized()
    else:
        # A cancellation (the end-of-message deadline, a shutdown) waits for a
        # parse under way: the spool is closed only once no thread reads it.
        verdict = await trio.to_thread.run_sync(check_spool, spool, limiter=PARSERS)
    if verdict.refusal is not None:
        ctx.api.set_error_reply(*verdict.refusal)
        return Ok(Status.REJECT)
    await send(ctx, verdict)
    return Ok(Status.CONTINUE)


def oversized() -> Verdict:
    """What to do with a message over MAX_MESSAGE (OVERSIZED)."""
    if OVERSIZED == "reject":
        text = f"Message too large to be checked for attachments ({MAX_MESSAGE} bytes at most)"
        return Verdict(refusal=("552", "5.3.4", text))
    return Verdict(summary=f"not checked (over {MAX_MESSAGE} bytes)")


async def send(ctx: Context[None, Spool], verdict: Verdict) -> None:
    """Queue the verdict's changes: the body (its packets must be contiguous), then headers."""
    if verdict.body is not None:
        await ctx.api.append_body_chunk(verdict.body)
    for fix in verdict.headers:
        if fix.index:
            await ctx.api.replace_header(fix.name, fix.index, fix.value)
        elif fix.value is not None:
            await ctx.api.add_header(fix.name, fix.value)
    for index in range(ctx.message_data.own_headers, 0, -1):  # the sender's own, last first
        await ctx.api.replace_header(HEADER, index, None)
    summary = verdict.summary.encode("ascii", "backslashreplace")  # names may be any text
    await ctx.api.add_header(HEADER, summary)


milter = Milter(
    "attachment-filter",
    handlers=[header, eoh, body, eom],
    actions=Actions.ADD_HEADER | Actions.REPLACE_HEADER | Actions.REPLACE_BODY,
    message_data=Spool,
    on_exception="tempfail",
)
