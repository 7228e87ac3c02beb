"""Scenario milters and SMTP helpers shared by the Postfix and Sendmail
end-to-end suites (``test_postfix_*`` and ``test_sendmail_*``): the same
milter runs behind each MTA, and only what the MTA itself does differently
(reply texts, its Received: header, its queue) is asserted per MTA.
"""

from __future__ import annotations

import hashlib
import smtplib
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

import attrs

from triomilter import (
    Actions,
    Context,
    MacroStage,
    Milter,
    SocketInfo,
    Status,
    on_body,
    on_close,
    on_connect,
    on_data,
    on_eoh,
    on_eom,
    on_header,
    on_helo,
    on_mail,
    on_rcpt,
)
from triomilter._handlers import AnyHandler

from ._milter_runner import Recorder, header_values
from .capture import CapturedMessage
from .raw_milter import Packet, packet

SENDER = "sender@example.test"

# -- stages: a milter recording every stage ------------------------------------

# Macros worth looking at in every stage (the MTAs send only those with a value).
WATCHED = (
    "j",
    "_",
    "v",
    "i",
    "{daemon_name}",
    "{daemon_addr}",
    "{client_addr}",
    "{client_port}",
    "{client_name}",
    "{mail_addr}",
    "{mail_host}",
    "{mail_mailer}",
    "{rcpt_addr}",
    "{rcpt_host}",
    "{rcpt_mailer}",
    "{if_name}",
    "{if_addr}",
    "{msg_id}",
)


def watched_macros(ctx: Context[object]) -> dict[str, str]:
    found = {name: ctx.api.macro_value(name) for name in WATCHED}
    return {name: value for name, value in found.items() if value is not None}


def recording_milter(
    rec: Recorder,
    extra_handlers: Sequence[AnyHandler] = (),
    macros: Mapping[MacroStage, str] | None = None,
) -> Milter:
    """A milter with a handler for every SMTP stage, recording arguments and macros."""

    @on_connect
    async def connect(ctx: Context[object], hostname: str, address: SocketInfo | None) -> Status:
        rec.add("connect", (hostname, address, watched_macros(ctx)))
        return Status.CONTINUE

    @on_helo
    async def helo(ctx: Context[object], hostname: str) -> Status:
        rec.add("helo", (hostname, watched_macros(ctx)))
        return Status.CONTINUE

    @on_mail
    async def mail(ctx: Context[object], args: list[str]) -> Status:
        rec.add("mail", (args, watched_macros(ctx)))
        return Status.CONTINUE

    @on_rcpt
    async def rcpt(ctx: Context[object], args: list[str]) -> Status:
        rec.add("rcpt", (args, watched_macros(ctx)))
        return Status.CONTINUE

    @on_data
    async def data(ctx: Context[object]) -> Status:
        rec.add("data", watched_macros(ctx))
        return Status.CONTINUE

    @on_header
    async def header(ctx: Context[object], name: str, value: str) -> Status:
        rec.add("header", (name, value))
        return Status.CONTINUE

    @on_eoh
    async def eoh(ctx: Context[object]) -> Status:
        rec.add("eoh", watched_macros(ctx))
        return Status.CONTINUE

    @on_body
    async def body(ctx: Context[object], chunk: bytes) -> Status:
        rec.add("body", chunk)
        return Status.CONTINUE

    @on_eom
    async def eom(ctx: Context[object]) -> Status:
        rec.add("eom", watched_macros(ctx))
        return Status.CONTINUE

    @on_close
    async def close(ctx: Context[object]) -> None:
        rec.add("close")

    handlers: list[AnyHandler] = [connect, helo, mail, rcpt, data, header, eoh, body, eom, close]
    return Milter("recorder", handlers=[*handlers, *extra_handlers], macros=macros or {})


def client_port(s: smtplib.SMTP) -> int:
    """The SMTP client's own port: what the MTA reports as the client's."""
    assert s.sock is not None
    port: int = s.sock.getsockname()[1]
    return port


def varied_body(size: int) -> bytes:
    """A body of about ``size`` bytes: varied lines, 8-bit bytes, leading dots."""
    lines = []
    total = 0
    i = 0
    while total < size:
        line = b"." * (i % 3) + f"line {i} ".encode() + bytes(range(0x21, 0x21 + i % 90))
        line += b"\xc3\xa9\r\n" if i % 7 == 0 else b"\r\n"
        lines.append(line)
        total += len(line)
        i += 1
    return b"".join(lines)


STAGE_HEADERS = (
    b"From: Sender <sender@example.test>\r\n"
    b"To: a@example.test, b@example.test\r\n"
    b"Subject: stages\r\n"
    b"X-Folded: first line\r\n\tsecond line\r\n  third line\r\n"
    b"X-Empty:\r\n"
    b"X-Spaces:    three leading spaces\r\n"
)

# -- replies: a policy milter deciding by what the client sends ----------------

MULTILINE = ["First line of the refusal,", "second line: 100% sure.", "Third and last line."]

Reply = tuple[str, str, str | list[str]]

# outcome word -> (status, custom reply (code, ext, lines) or None)
VERDICTS: dict[str, tuple[Status, Reply | None]] = {
    "reject": (Status.REJECT, None),
    "tempfail": (Status.TEMPFAIL, None),
    "custom": (Status.REJECT, ("554", "5.7.0", "Custom refusal from the milter")),
    "multiline": (Status.REJECT, ("550", "5.7.2", MULTILINE)),
    "customtemp": (
        Status.TEMPFAIL,
        ("452", "4.3.1", ["Custom temporary failure", "try again in a while"]),
    ),
}


def outcome_of(word: str, stage: str) -> str | None:
    """``stage-outcome`` -> outcome, else None."""
    prefix = stage + "-"
    return word[len(prefix) :] if word.startswith(prefix) else None


def verdict(ctx: Context[object], outcome: str | None) -> Status:
    if outcome is None:
        return Status.CONTINUE
    if outcome == "accept":
        return Status.ACCEPT
    if outcome == "discard":
        return Status.DISCARD
    status, reply = VERDICTS[outcome]
    if reply is not None:
        ctx.api.set_error_reply(*reply)
    return status


def policy_milter(rec: Recorder, connect: Status = Status.CONTINUE) -> Milter:
    """Decides by the HELO name ``helo-OUTCOME.test.invalid``, the sender
    ``mail-OUTCOME@...``, a recipient ``rcpt-OUTCOME@...`` (that recipient
    only) or the header ``X-Eom: OUTCOME`` (end of message); records every
    stage it is asked about."""

    @on_connect
    async def on_conn(ctx: Context[object], hostname: str, address: SocketInfo | None) -> Status:
        rec.add("connect")
        return connect

    @on_helo
    async def helo(ctx: Context[object], hostname: str) -> Status:
        rec.add("helo", hostname)
        return verdict(ctx, outcome_of(hostname.split(".")[0], "helo"))

    @on_mail
    async def mail(ctx: Context[object], args: list[str]) -> Status:
        rec.add("mail", args[0])
        ctx.data = None
        return verdict(ctx, outcome_of(args[0].strip("<>").split("@")[0], "mail"))

    @on_rcpt
    async def rcpt(ctx: Context[object], args: list[str]) -> Status:
        rec.add("rcpt", args[0])
        return verdict(ctx, outcome_of(args[0].strip("<>").split("@")[0], "rcpt"))

    @on_header
    async def header(ctx: Context[object], name: str, value: str) -> Status:
        rec.add("header", name)
        if name == "X-Eom":
            ctx.data = value
        return Status.CONTINUE

    @on_eoh
    async def eoh(ctx: Context[object]) -> Status:
        rec.add("eoh")
        return Status.CONTINUE

    @on_body
    async def body(ctx: Context[object], chunk: bytes) -> Status:
        rec.add("body")
        return Status.CONTINUE

    @on_eom
    async def eom(ctx: Context[object]) -> Status:
        rec.add("eom")
        return verdict(ctx, ctx.data if isinstance(ctx.data, str) else None)

    return Milter("policy", handlers=[on_conn, helo, mail, rcpt, header, eoh, body, eom])


def policy_message(eom: str | None = None) -> bytes:
    extra = f"X-Eom: {eom}\r\n".encode() if eom else b""
    return b"Subject: replies\r\n" + extra + b"\r\nbody\r\n"


def text_reply(reply: tuple[int, bytes]) -> tuple[int, str]:
    code, text = reply
    return code, text.decode()


def send_envelope(
    s: smtplib.SMTP, sender: str, rcpts: Sequence[str], data: bytes
) -> tuple[tuple[int, str], list[tuple[int, str]], tuple[int, str] | None]:
    """MAIL, each RCPT, then DATA if a recipient was accepted: the replies."""
    mail = text_reply(s.mail(sender))
    if mail[0] != 250:
        s.rset()
        return mail, [], None
    rcpt_replies = [text_reply(s.rcpt(rcpt)) for rcpt in rcpts]
    if not any(code == 250 for code, _ in rcpt_replies):
        s.rset()
        return mail, rcpt_replies, None
    try:
        return mail, rcpt_replies, text_reply(s.data(data))
    except smtplib.SMTPDataError as exc:  # refused at DATA (no 354)
        s.rset()
        err = exc.smtp_error
        return mail, rcpt_replies, (exc.smtp_code, err.decode() if isinstance(err, bytes) else err)


# -- actions: a milter changing things at end of message ------------------------

ALL_ACTIONS = (
    Actions.ADD_HEADER
    | Actions.REPLACE_HEADER
    | Actions.ADD_RECIPIENT
    | Actions.ADD_RECIPIENT_EXT
    | Actions.REMOVE_RECIPIENT
    | Actions.REPLACE_SENDER
    | Actions.REPLACE_BODY
    | Actions.QUARANTINE
)

EomChanges = Callable[[Context[object]], Awaitable[None]]


def eom_milter(changes: EomChanges, actions: Actions = ALL_ACTIONS) -> Milter:
    @on_eom
    async def eom(ctx: Context[object]) -> Status:
        await changes(ctx)
        return Status.CONTINUE

    return Milter("eom-actions", handlers=[eom], actions=actions)


ORIGINAL_HEADERS = (
    b"From: Sender <sender@example.test>\r\n"
    b"Subject: header changes\r\n"
    b"X-B: first b\r\n"
    b"X-Delete-Me: going away\r\n"
    b"X-B: second b\r\n"
    b"X-Folded: old\r\n\tfolded value\r\n"
)
BODY = b"the body\r\n.with a leading dot\r\n"
ORIGINAL = ORIGINAL_HEADERS + b"\r\n" + BODY


def replacement_body(size: int) -> bytes:
    """``size`` bytes of body: 8-bit bytes, a dot line, long and empty lines."""
    pattern = (
        b".dot-stuffed line\r\n"
        b"..two dots\r\n"
        b"8-bit \xc3\xa4\xc3\xb6\xc3\xbc \xff\xfe\r\n"
        b"\r\n"
        b"trailing spaces   \r\n" + b"L" * 1500 + b"\r\n"
    )
    data = (pattern * (size // len(pattern) + 1))[: size - 2]
    return data + b"\r\n"


# -- traffic ---------------------------------------------------------------------

# A latin-1 Subject (not UTF-8) and a UTF-8 one, with a folded 8-bit value.
EIGHT_BIT_HEADERS = (
    b"Subject: caf\xe9 cr\xe8me br\xfbl\xe9e\r\n"
    b"X-Utf8: \xc3\xa9t\xc3\xa9 \xe2\x9c\x93\r\n"
    b"X-Folded-8bit: \xff\xfe first\r\n\t\x80 second\r\n"
)
EIGHT_BIT_MESSAGE = EIGHT_BIT_HEADERS + b"\r\nbody \xe9\r\n"


@attrs.define
class BodyHash:
    size: int = 0
    chunks: int = 0
    digest: hashlib._Hash = attrs.field(factory=hashlib.sha256)


def hashing_milter() -> Milter:
    """Adds X-Body-Size, X-Body-Chunks and X-Body-SHA256 of the body it saw."""

    @on_mail
    async def mail(ctx: Context[BodyHash], args: list[str]) -> Status:
        ctx.data = BodyHash()
        return Status.CONTINUE

    @on_body
    async def body(ctx: Context[BodyHash], chunk: bytes) -> Status:
        assert ctx.data is not None
        ctx.data.size += len(chunk)
        ctx.data.chunks += 1
        ctx.data.digest.update(chunk)
        return Status.CONTINUE

    @on_eom
    async def eom(ctx: Context[BodyHash]) -> Status:
        assert ctx.data is not None
        await ctx.api.add_header("X-Body-Size", str(ctx.data.size))
        await ctx.api.add_header("X-Body-Chunks", str(ctx.data.chunks))
        await ctx.api.add_header("X-Body-SHA256", ctx.data.digest.hexdigest())
        return Status.CONTINUE

    return Milter("hasher", handlers=[mail, body, eom], actions=Actions.ADD_HEADER)


# -- the milter process (CLI): panics and shutdown ------------------------------


@attrs.frozen
class Outcome:
    """What the SMTP client was told about one message."""

    subject: str
    stage: str  # the command that got the final answer
    code: int
    text: bytes


def send_message(s: smtplib.SMTP, subject: str, rcpt: str = "r@example.test") -> Outcome:
    """One message on an open session; the first non-2xx/3xx answer, or DATA's."""
    code, text = s.mail(SENDER)
    if code != 250:
        s.rset()
        return Outcome(subject, "mail", code, text)
    code, text = s.rcpt(rcpt)
    if code != 250:
        s.rset()
        return Outcome(subject, "rcpt", code, text)
    return send_data(s, subject)


def send_data(s: smtplib.SMTP, subject: str) -> Outcome:
    """DATA with a small message (after MAIL and RCPT)."""
    try:
        code, text = s.data(f"Subject: {subject}\r\n\r\nbody of {subject}\r\n".encode())
    except smtplib.SMTPDataError as exc:
        s.rset()
        text = exc.smtp_error if isinstance(exc.smtp_error, bytes) else exc.smtp_error.encode()
        return Outcome(subject, "data command", exc.smtp_code, text)
    return Outcome(subject, "data", code, text)


def subject_of(msg: CapturedMessage) -> str:
    (subject,) = header_values(msg.data, b"Subject")
    return subject.decode()


def filtered(msg: CapturedMessage) -> bool:
    """Did the CLI milter (``cli_milters.gated``/``panicky``) tag this message?"""
    return header_values(msg.data, b"X-Filtered") == [f"subject={subject_of(msg)}".encode()]


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


# -- header indexes: what `triomilter check` must predict ------------------------

INSERT_MESSAGE = (
    b"From: a@example.org\r\nDate: Wed, 31 Dec 2025 23:00:00 +0000\r\nSubject: s\r\n\r\nx\r\n"
)


def inserting(conn: socket.socket, pkt: Packet) -> bytes | None:
    """At end of message: headers inserted at indexes all around the MTA's own, and one changed."""
    if pkt.code != b"E":
        return None
    order = [5, 1, 3, 0, 12, 2, 7, 4, 9]
    inserts = [packet(b"i", struct.pack(">I", n) + b"X-At-%d\0v\0" % n) for n in order]
    change = packet(b"m", struct.pack(">I", 1) + b"Date\0Thu, 01 Jan 2026 00:00:00 +0000\0")
    return b"".join(inserts) + change + packet(b"c")
