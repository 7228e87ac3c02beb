"""`triomilter check`, the run: real messages through a milter, imitating Postfix or Sendmail.

The MTA side is `triomilter.testing`'s `MilterClient` (the engine's MTA
role: every reply is checked against the protocol); this module decides
what a real MTA would send — its offer, its macros per stage, the envelope,
the headers and the body in 65535-byte chunks, an abort after each message
(Postfix) — and records every step and reply. The messages come from
`_mail.MessageSource`; the changes are applied by `_delivery.deliver`; the
report is rendered by `_check_output`.

Several messages run on one connection, like an MTA reusing it: negotiate,
CONNECT and HELO once, then each message. A protocol error during a message
ends that connection (the message's verdict is ERROR) and the next message
gets a new one, as an MTA's next SMTP session would; an error before any
message (the milter unreachable, the negotiation refused, a panic) stops.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from functools import partial
from typing import BinaryIO

import attrs
import trio

from ._check import (
    DECISIVE,
    DEFAULT_CLIENT_PORT,
    MTA_ADDRESS,
    MTA_HOSTNAME,
    VERDICT_OF_STATUS,
    CheckOptions,
    CheckReport,
    MacroBook,
    MessageRecord,
    Negotiation,
    SessionRecord,
    StepRecord,
    Verdict,
    angle,
    bare,
    parse_client_address,
    parse_path,
    stage_lists,
)
from ._delivery import Envelope, Mta, deliver
from ._display import os_error
from ._errors import MilterPanic
from ._mail import Message, MessageSource, addresses, client_of, header_values
from ._milter import Milter
from ._sockets import parse_socket_spec
from ._status import Status
from .protocol import (
    CHUNK_SIZE,
    NO_FLAG,
    CommandCode,
    MacroStage,
    ProtocolError,
    ProtocolOpts,
    Shutdown,
)
from .testing import (
    POSTFIX_ACTIONS,
    POSTFIX_OPTS,
    POSTFIX_VERSION,
    SENDMAIL_ACTIONS,
    SENDMAIL_OPTS,
    SENDMAIL_VERSION,
    Address,
    EomReply,
    MilterClient,
    MilterTimeout,
    StepReply,
    open_in_memory,
    open_tcp,
    open_unix,
)


def _no_nul(data: bytes) -> bytes:
    # Commands cannot carry a NUL (the strings are NUL-terminated): MTAs drop them.
    return data.replace(b"\0", b"")


# --- the run -------------------------------------------------------------------------------


@attrs.define
class _Connection:
    """What a session knows for its messages."""

    client: MilterClient
    record: SessionRecord
    book: MacroBook
    decided: tuple[str, StepReply] | None = None
    """A decision the milter made at CONNECT or HELO, for every message."""


class Checker:
    """Runs the messages of a `MessageSource` through the milter; see the module docstring."""

    def __init__(self, options: CheckOptions, source: MessageSource) -> None:
        self.options = options
        self.source = source
        target = options.target
        if isinstance(target, Milter):
            self.report = CheckReport(target.name, options.mta, in_memory=True)
        else:
            self.report = CheckReport(target, options.mta)
        self._queue_ids = 0
        self._host: tuple[str, str, Address] | None = None

    async def run(self) -> CheckReport:
        message = await self.source.next_message()
        self._host = self._client(message)
        while True:
            index = len(self.report.sessions)
            message, stop = await self._session(index, message)
            if stop or message is None:
                break
        return self.report

    def _client(self, message: Message | None) -> tuple[str, str, Address]:
        """The SMTP client: options, else the first message's Received:, else localhost."""
        options = self.options
        found = client_of(message.fields) if message is not None else None
        name = options.client_name or (found.name if found else "localhost")
        if options.client_address is not None:
            address = parse_client_address(options.client_address)
        elif found is not None:
            address = (found.address, DEFAULT_CLIENT_PORT)
        else:
            address = ("127.0.0.1", DEFAULT_CLIENT_PORT)
        helo = options.helo or (found.helo if found else None)
        if helo is None:
            helo = name if not name.startswith("[") else "localhost"
        return name, helo, address

    def _open(self) -> AbstractAsyncContextManager[MilterClient]:
        options = self.options
        if options.mta is Mta.POSTFIX:
            version, actions, opts = POSTFIX_VERSION, POSTFIX_ACTIONS, POSTFIX_OPTS
        else:
            version, actions, opts = SENDMAIL_VERSION, SENDMAIL_ACTIONS, SENDMAIL_OPTS
        timeout = options.step_timeout
        target = options.target
        if isinstance(target, Milter):
            return open_in_memory(
                target, version=version, actions=actions, opts=opts, timeout=timeout
            )
        spec = parse_socket_spec(target)
        if spec.path:
            return open_unix(
                spec.path, version=version, actions=actions, opts=opts, timeout=timeout
            )
        host = spec.host or ("::1" if spec.family.value == "inet6" else "127.0.0.1")
        return open_tcp(
            host, spec.port, version=version, actions=actions, opts=opts, timeout=timeout
        )

    def _offer(self) -> tuple[int, int, int]:
        if self.options.mta is Mta.POSTFIX:
            return POSTFIX_VERSION, int(POSTFIX_ACTIONS), int(POSTFIX_OPTS)
        return SENDMAIL_VERSION, int(SENDMAIL_ACTIONS), int(SENDMAIL_OPTS)

    async def _session(self, index: int, message: Message | None) -> tuple[Message | None, bool]:
        """One connection: its messages until the input ends or an error; (next, stop)."""
        record = SessionRecord(Negotiation(self._offer()))
        self.report.sessions.append(record)
        first = len(self.report.messages)
        stop = False
        try:
            async with self._open() as client:
                conn = self._negotiated(client, record)
                if not await self._greet(conn):
                    return None, True
                while message is not None:
                    ok = await self._message(conn, index, message)
                    message = await self.source.next_message()
                    if not ok:
                        break
        except MilterPanic as exc:
            record.error = f"{exc} ({exc.__cause__!r})" if exc.__cause__ else str(exc)
            self._panicked(first)
            stop = True
        except (ProtocolError, MilterTimeout, OSError, ValueError) as exc:
            record.error = _describe(exc)
            stop = True
        return message, stop

    def _panicked(self, first: int) -> None:
        # The panicking step and every later one were answered TEMPFAIL.
        for message in self.report.messages[first:]:
            if message.verdict is Verdict.TEMPFAILED:
                message.verdict = Verdict.ERROR
                message.error = "a handler panicked (answered TEMPFAIL)"

    def _negotiated(self, client: MilterClient, record: SessionRecord) -> _Connection:
        negotiated = client.negotiated
        requested = client.requested_macros
        record.negotiation.version = negotiated.version
        record.negotiation.actions = int(negotiated.actions)
        record.negotiation.opts = int(negotiated.opts)
        record.negotiation.macros = {stage.name: names for stage, names in requested.items()}
        lists = stage_lists(self.options.mta, requested)
        return _Connection(client, record, MacroBook(self.options.mta, lists, self.options.macros))

    async def _greet(self, conn: _Connection) -> bool:
        """CONNECT and HELO; False if the session failed."""
        assert self._host is not None
        name, helo, address = self._host
        self._connection_macros(conn.book, name, address)
        client = conn.client
        try:
            args = [name.encode(), _describe_address(address)]
            connect = partial(client.connect, name, address)
            step, reply = await self._step(conn, "connect", args, MacroStage.CONNECT, connect)
            conn.record.steps.append(step)
            if reply.sent and reply.status in DECISIVE:
                conn.decided = ("CONNECT", reply)
                return True
            send = partial(client.helo, helo)
            step, reply = await self._step(conn, "helo", [helo.encode()], MacroStage.HELO, send)
            conn.record.steps.append(step)
            if reply.sent and reply.status in DECISIVE:
                conn.decided = ("HELO", reply)
        except (ProtocolError, MilterTimeout) as exc:
            conn.record.error = _describe(exc)
            return False
        return True

    def _connection_macros(self, book: MacroBook, name: str, address: Address) -> None:
        ip = address[0] if isinstance(address, tuple) else None
        port = str(address[1]) if isinstance(address, tuple) else None
        postfix = self.options.mta is Mta.POSTFIX
        # Postfix calls a client without a verified name "unknown" in its macros.
        client_name = "unknown" if postfix and name.startswith("[") else name
        book.values.update(
            {
                "j": MTA_HOSTNAME,
                "daemon_name": MTA_HOSTNAME if postfix else "MTA",
                "daemon_addr": MTA_ADDRESS,
                "daemon_port": "25",
                "if_name": MTA_HOSTNAME,
                "if_addr": MTA_ADDRESS,
                "v": "Postfix 3.7.11" if postfix else "8.17.1.9",
                "_": f"{client_name} [{ip or 'unknown'}]",
                "client_name": client_name,
                "client_ptr": client_name,
            }
        )
        if ip is not None and port is not None:
            book.values["client_addr"] = ip.removeprefix("IPv6:")
            book.values["client_port"] = port

    async def _step(
        self,
        conn: _Connection,
        stage: str,
        args: list[bytes],
        macro_stage: MacroStage | None,
        send: Callable[..., Awaitable[StepReply]],
    ) -> tuple[StepRecord, StepReply]:
        """Send one step (``send(macros=...)``) and record it."""
        macros = conn.book.at(macro_stage) if macro_stage is not None else None
        started = trio.current_time()
        reply = await send(macros=macros)
        record = StepRecord(stage, args, dict(macros) if macros else None, reply.sent)
        record.ms = (trio.current_time() - started) * 1000 if reply.sent else None
        record.status = _status_name(reply)
        record.reply = reply.text
        if not reply.sent:
            flag = NO_FLAG.get(_CODE_OF_STAGE[stage])
            if flag is not None and conn.client.negotiated_opts & flag:
                record.note = f"not sent: the milter negotiated {flag.name}"
            else:
                record.note = "not sent"
        elif reply.status is Status.NOREPLY:
            record.note = "no reply due (NOREPLY negotiated)"
        return record, reply

    # --- one message ---------------------------------------------------------------------

    async def _message(self, conn: _Connection, session: int, message: Message) -> bool:
        """Run one message; False if the session cannot go on."""
        sender, recipients = self._envelope(message)
        record = MessageRecord(message.name, session, Envelope(sender[0], sender[1], recipients))
        record.fields = message.fields
        record.separator = message.separator
        record.newline = message.newline
        self.report.messages.append(record)
        ok = True
        if conn.decided is not None:
            where, reply = conn.decided
            self._decide(record, reply.status, reply.text, where)
        else:
            try:
                await self._transaction(conn, message, record)
            except (ProtocolError, MilterTimeout) as exc:
                record.verdict = Verdict.ERROR
                record.error = _describe(exc)
                ok = False
        if record.verdict is Verdict.ACCEPTED and record.delivery is None:
            # Accepted before end of message: delivered as it came.
            record.delivery = deliver(
                message.fields,
                record.envelope,
                [],
                self.options.mta,
                leading_space=False,
                newline=message.newline,
            )
        if record.body is None:
            await self._read_body(record)
        return ok

    async def _read_body(self, record: MessageRecord) -> None:
        """Read a body the milter did not get (decided earlier): its size, and spooled."""
        spool = _Spool() if self.options.keep_body else None
        while (piece := await self.source.body_piece()) is not None:
            record.body_size += len(piece.wire)
            if spool is not None:
                spool.write(piece.raw)
        if spool is not None:
            record.body = spool.done()

    def _envelope(
        self, message: Message
    ) -> tuple[tuple[bytes, tuple[bytes, ...]], list[tuple[bytes, tuple[bytes, ...]]]]:
        """Sender and recipients: the options, else from the headers (see docs/tools.md)."""
        options = self.options
        fields = message.fields
        if options.sender is not None:
            sender = parse_path(options.sender)
        else:
            mbox = message.mbox_sender
            found = (
                [mbox]
                if mbox and mbox != b"MAILER-DAEMON"
                else addresses(header_values(fields, b"Return-Path"))
                or addresses(header_values(fields, b"From"))
            )
            sender = (angle(found[0]), ()) if found else (b"<>", ())
        if options.recipients:
            return sender, [parse_path(text) for text in options.recipients]
        named = [v for n in (b"To", b"Cc", b"Bcc") for v in header_values(fields, n)]
        delivered = [
            v for n in (b"Delivered-To", b"X-Original-To") for v in header_values(fields, n)
        ]
        found = addresses(named) or addresses(delivered)
        return sender, [(angle(a), ()) for a in found] or [(b"<postmaster@localhost>", ())]

    def _decide(self, record: MessageRecord, status: Status, text: str | None, where: str) -> None:
        record.verdict = VERDICT_OF_STATUS.get(status, Verdict.ACCEPTED)
        record.decided_at = where
        record.reply = text or self._default_reply(status, where)

    def _default_reply(self, status: Status, where: str) -> str | None:
        """What the MTA tells the SMTP client when the milter gave no text (protocol.md §10.2)."""
        postfix = self.options.mta is Mta.POSTFIX
        if status is Status.REJECT:
            if postfix or where != "EOM":
                return "550 5.7.1 Command rejected"
            return "554 5.7.1 Command rejected"
        if status is Status.TEMPFAIL:
            if postfix:
                return "451 4.7.1 Service unavailable - try again later"
            return "451 4.3.2 Please try again later"
        return None

    async def _transaction(
        self, conn: _Connection, message: Message, record: MessageRecord
    ) -> None:
        postfix = self.options.mta is Mta.POSTFIX
        self._queue_ids += 1
        queue_id = f"4C{self._queue_ids:08X}" if postfix else f"5B4CqLfx{self._queue_ids:06d}"
        self._message_macros(conn.book, record.envelope, queue_id)
        ended = await self._envelope_steps(conn, record, queue_id)
        if ended is None:
            ended = "decided" if await self._content(conn, message, record) else None
        if ended is None:
            await self._eom(conn, message, record)
        # Postfix sends ABORT after every message; Sendmail when a message it
        # had not finished is abandoned (no recipient left), not after a
        # milter's decision (protocol.md §7).
        if postfix or ended == "no recipient":
            await conn.client.abort()

    def _message_macros(self, book: MacroBook, envelope: Envelope, queue_id: str) -> None:
        for key in ("i", "msg_id", "mail_addr", "mail_host", "rcpt_addr", "rcpt_host"):
            book.values.pop(key, None)
        postfix = self.options.mta is Mta.POSTFIX
        address = bare(envelope.sender)
        if address:
            book.values["mail_addr"] = address.decode("utf-8", "replace")
            book.values["mail_host"] = address.rpartition(b"@")[2].decode("utf-8", "replace")
        book.values["mail_mailer"] = "smtp" if postfix else "esmtp"
        if not postfix:
            book.values["i"] = queue_id  # Sendmail knows its queue id from MAIL on

    async def _envelope_steps(
        self, conn: _Connection, record: MessageRecord, queue_id: str
    ) -> str | None:
        """MAIL, every RCPT, DATA; why the message ended there, or None."""
        client = conn.client
        envelope = record.envelope
        args = tuple(map(_no_nul, envelope.sender_args))
        send = partial(client.mail, _no_nul(envelope.sender), *args)
        step, reply = await self._step(
            conn, "mail", [envelope.sender, *args], MacroStage.MAIL, send
        )
        record.steps.append(step)
        if reply.sent and reply.status in DECISIVE:
            self._decide(record, reply.status, reply.text, "MAIL")
            return "decided"
        ended = await self._recipients(conn, record, queue_id)
        if ended is not None:
            return ended
        step, reply = await self._step(conn, "data", [], MacroStage.DATA, client.data)
        record.steps.append(step)
        if reply.sent and reply.status in DECISIVE:
            self._decide(record, reply.status, reply.text, "DATA")
            return "decided"
        return None

    async def _recipients(
        self, conn: _Connection, record: MessageRecord, queue_id: str
    ) -> str | None:
        book = conn.book
        envelope = record.envelope
        accepted: list[tuple[bytes, tuple[bytes, ...]]] = []
        statuses: list[Status] = []
        for position, (rcpt, rcpt_args) in enumerate(envelope.recipients):
            address = bare(rcpt)
            book.values["rcpt_addr"] = address.decode("utf-8", "replace")
            book.values["rcpt_host"] = address.rpartition(b"@")[2].decode("utf-8", "replace")
            book.values["rcpt_mailer"] = "smtp" if self.options.mta is Mta.POSTFIX else "esmtp"
            args = tuple(map(_no_nul, rcpt_args))
            send = partial(conn.client.rcpt, _no_nul(rcpt), *args)
            step, reply = await self._step(conn, "rcpt", [rcpt, *args], MacroStage.RCPT, send)
            record.steps.append(step)
            if reply.sent and reply.status in (Status.REJECT, Status.TEMPFAIL):
                statuses.append(reply.status)
                text = reply.text or self._default_reply(reply.status, "RCPT")
                record.refused.append((rcpt, text or reply.status.name))
                continue
            accepted.append((rcpt, rcpt_args))
            book.values["i"] = queue_id  # Postfix picks it once a recipient is accepted
            if reply.sent and reply.status in (Status.ACCEPT, Status.DISCARD):
                self._decide(record, reply.status, reply.text, "RCPT")
                envelope.recipients = accepted + envelope.recipients[position + 1 :]
                return "decided"
        for key in ("rcpt_addr", "rcpt_host", "rcpt_mailer"):
            book.values.pop(key, None)
        envelope.recipients = accepted
        if accepted:
            return None
        self._decide(
            record, Status.TEMPFAIL if Status.TEMPFAIL in statuses else Status.REJECT, None, "RCPT"
        )
        record.reply = "no recipient accepted"
        return "no recipient"

    async def _content(self, conn: _Connection, message: Message, record: MessageRecord) -> bool:
        """The headers, end of headers and the body; True if the message ended there."""
        client = conn.client
        leading_space = bool(client.negotiated_opts & ProtocolOpts.HEADER_LEADING_SPACE)
        # Postfix sends the end-of-headers macros before each header (protocol.md §10.4).
        header_stage = MacroStage.EOH if self.options.mta is Mta.POSTFIX else None
        for field in message.fields:
            value = field.value
            if not leading_space and value.startswith(b" "):
                value = value[1:]  # the one space after the colon (protocol.md §8)
            name, value = _no_nul(field.name), _no_nul(value)
            send = partial(client.header, name, value)
            step, reply = await self._step(conn, "header", [name, value], header_stage, send)
            record.steps.append(step)
            if reply.sent and reply.status in DECISIVE:
                self._decide(record, reply.status, reply.text, "HEADER")
                return True
        step, reply = await self._step(conn, "eoh", [], MacroStage.EOH, client.eoh)
        record.steps.append(step)
        if reply.sent and reply.status in DECISIVE:
            self._decide(record, reply.status, reply.text, "EOH")
            return True
        body_stage = MacroStage.EOM if self.options.mta is Mta.POSTFIX else None
        return await _Body(self, conn, record, body_stage).run()

    async def _eom(self, conn: _Connection, message: Message, record: MessageRecord) -> None:
        client, book = conn.client, conn.book
        if self.options.mta is Mta.SENDMAIL:
            ids = header_values(message.fields, b"Message-Id")
            generated = f"<20250101000000.{book.values.get('i', '')}@{MTA_HOSTNAME}>"
            book.values["msg_id"] = ids[0].decode("utf-8", "replace") if ids else generated
        step, reply = await self._step(conn, "eom", [], MacroStage.EOM, client.eom)
        record.steps.append(step)
        assert isinstance(reply, EomReply)
        record.changes = list(reply.modifications)
        record.progress = reply.progress
        self._decide(record, reply.status, reply.text, "EOM")
        if record.verdict is Verdict.ACCEPTED:
            record.delivery = deliver(
                message.fields,
                record.envelope,
                record.changes,
                self.options.mta,
                leading_space=bool(client.negotiated_opts & ProtocolOpts.HEADER_LEADING_SPACE),
                newline=message.newline,
            )


_CODE_OF_STAGE = {
    "connect": CommandCode.CONNECT,
    "helo": CommandCode.HELO,
    "mail": CommandCode.MAIL,
    "rcpt": CommandCode.RCPT,
    "data": CommandCode.DATA,
    "header": CommandCode.HEADER,
    "eoh": CommandCode.EOH,
    "body": CommandCode.BODY,
    "eom": CommandCode.EOM,
}


class _Spool:
    """A body as read, in memory up to 1 MiB, then in a temporary file."""

    def __init__(self) -> None:
        self.file: BinaryIO = tempfile.SpooledTemporaryFile(max_size=1024 * 1024)  # type: ignore[assignment]  # noqa: SIM115
        self.pending = bytearray()

    def write(self, data: bytes) -> None:
        self.pending += data
        if len(self.pending) >= 256 * 1024:
            self.file.write(self.pending)
            self.pending.clear()

    def done(self) -> BinaryIO:
        self.file.write(self.pending)
        self.pending.clear()
        self.file.seek(0)
        return self.file


class _Body:
    """Streams one message's body to the milter in 65535-byte chunks, like an MTA."""

    def __init__(
        self,
        checker: Checker,
        conn: _Connection,
        record: MessageRecord,
        stage: MacroStage | None,
    ) -> None:
        self.checker = checker
        self.conn = conn
        self.record = record
        self.stage = stage
        self.pending = bytearray()
        self.chunks = 0
        self.sent = 0
        self.ms = 0.0
        self.reply: StepReply | None = None
        self.stopped = False
        self.macros: dict[str, str] | None = None

    async def run(self) -> bool:
        """True if the milter decided the message during the body."""
        source = self.checker.source
        spool = _Spool() if self.checker.options.keep_body else None
        while (piece := await source.body_piece()) is not None:
            self.record.body_size += len(piece.wire)
            if spool is not None:
                spool.write(piece.raw)
            if self.stopped:
                continue  # not sent (SKIP or a decision), read all the same
            self.pending += piece.wire
            while len(self.pending) >= CHUNK_SIZE and not self.stopped:
                await self._send(bytes(self.pending[:CHUNK_SIZE]))
                del self.pending[:CHUNK_SIZE]
        if self.pending and not self.stopped:
            await self._send(bytes(self.pending))
        if spool is not None:
            self.record.body = spool.done()
        return self._record()

    async def _send(self, chunk: bytes) -> None:
        book = self.conn.book
        macros = book.at(self.stage) if self.stage is not None else None
        if self.macros is None and macros:
            self.macros = dict(macros)  # (the first chunk's: the same for every chunk)
        started = trio.current_time()
        reply = await self.conn.client.body(chunk, macros=macros)
        self.reply = reply
        if not reply.sent:
            self.stopped = True
            return
        self.ms += (trio.current_time() - started) * 1000
        self.chunks += 1
        self.sent += len(chunk)
        if reply.status not in (Status.CONTINUE, Status.NOREPLY):
            self.stopped = True

    def _record(self) -> bool:
        record = self.record
        reply = self.reply
        step = StepRecord("body", [str(record.body_size).encode()], self.macros)
        record.steps.append(step)
        if reply is None:
            step.sent, step.note = False, "empty body: nothing to send"
            return False
        step.sent = self.chunks > 0
        step.ms = self.ms if self.chunks else None
        step.status = _status_name(reply)
        step.reply = reply.text
        step.note = f"{self.sent} bytes in {self.chunks} chunk{'s' if self.chunks != 1 else ''}"
        if not reply.sent and self.conn.client.negotiated_opts & ProtocolOpts.NO_BODY:
            step.note = "not sent: the milter negotiated NO_BODY"
        elif reply.status is Status.SKIP:
            step.note += ", then SKIP: the rest was not sent"
        if reply.sent and reply.status in DECISIVE:
            self.checker._decide(record, reply.status, reply.text, "BODY")
            return True
        return False


def _status_name(reply: StepReply) -> str:
    if isinstance(reply.raw, Shutdown):
        return "SHUTDOWN"
    return reply.status.name


def _describe_address(address: Address) -> bytes:
    if address is None:
        return b"unknown"
    if isinstance(address, tuple):
        host = str(address[0])
        return (f"[{host}]:{address[1]}" if ":" in host else f"{host}:{address[1]}").encode()
    return b"unix:" + os.fsencode(str(address))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, TimeoutError):
        return f"cannot reach the milter: {os_error(exc)}"
    if isinstance(exc, MilterTimeout):
        return f"timeout: {exc}"
    return f"{type(exc).__name__}: {exc}"


async def run_check(options: CheckOptions, stdin: BinaryIO | None = None) -> CheckReport:
    """Run ``options.inputs`` through the milter and report (the milter's faults included)."""
    source = MessageSource(options.inputs, stdin)
    try:
        return await Checker(options, source).run()
    finally:
        await source.aclose()


__all__ = ["Checker", "run_check"]
