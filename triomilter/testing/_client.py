"""`MilterClient`: an MTA simulator with one async method per SMTP step.

Built on the engine's MTA role (``protocol.MtaConnection``), which checks
every command against the session and every reply against its command. On
top of it the client behaves like a well-behaved MTA (protocol.md §3, §6):

- steps the milter disabled with ``NO_*`` are not sent (status CONTINUE);
- steps whose ``NOREPLY_*`` option was negotiated await nothing (NOREPLY);
- after SKIP, the message's further body chunks are not sent;
- after the milter decided a message (accept, reject, tempfail, discard),
  that message's further steps are not sent; after it decided the
  connection at CONNECT or HELO (accept, reject, tempfail), no further step
  of the connection is sent (Postfix stops talking to it, §10.2).

Theory of operation: a reader task moves received bytes into an unbounded
channel; a step drains what has already arrived before it sends anything,
so a reply the milter sent when none was due (after a ``NOREPLY_*`` step,
twice to one command) is reported at the next step, not taken for the
reply to it. In memory, the client first lets every task settle, which
makes that check exact.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TypeAlias, TypeVar

import trio
import trio.testing

from .._context import SocketFamily, SocketInfo
from .._status import Status
from ..protocol import (
    ABORT,
    ALL_ACTIONS,
    ALL_PROTOCOL_OPTS,
    CHUNK_SIZE,
    DATA,
    END_OF_HEADERS,
    QUIT,
    QUIT_NEW_CONNECTION,
    Actions,
    AddressFamily,
    Body,
    Command,
    CommandCode,
    Connect,
    DefineMacros,
    EndOfMessage,
    Header,
    Helo,
    LocalProtocolError,
    MacroStage,
    Mail,
    Modification,
    MtaConnection,
    NeedData,
    Negotiated,
    OptionNegotiation,
    Progress,
    ProtocolOpts,
    Rcpt,
    ReplyCode,
    Unknown,
    command_name,
)
from ..protocol import Reply as WireReply
from ._errors import MilterClosed, MilterTimeout
from ._matchers import to_bytes, to_text
from ._results import EomReply, StepReply, modifications_of, status_of, step_reply

T = TypeVar("T")

Text: TypeAlias = str | bytes
"""Strings may be ``str`` (sent as UTF-8) or ``bytes`` (sent as they are)."""

Address: TypeAlias = (
    SocketInfo | tuple[str, int] | tuple[str, int, int, int] | str | bytes | os.PathLike[str] | None
)
"""The SMTP client's address for `MilterClient.connect`.

An ``(ip, port)`` tuple (IPv4 or IPv6, as ``socket`` gives them), a UNIX
socket path, a `triomilter.SocketInfo`, or ``None`` for an unknown family.
"""

Macros: TypeAlias = Mapping[str, Text] | Mapping[bytes, Text]
"""Macro values by name: ``{"i": "4AB12", "{auth_authen}": "alice"}``."""

POSTFIX_VERSION = 6
"""What Postfix 3.x (``milter_protocol = 6``, the default) offers: protocol version 6."""
POSTFIX_ACTIONS = ALL_ACTIONS
"""What Postfix 3.x offers: every action (as Sendmail 8.14+ does)."""
POSTFIX_OPTS = ALL_PROTOCOL_OPTS
"""What Postfix 3.x offers: every protocol step of version 6."""
DEFAULT_TIMEOUT = 10.0
"""Seconds each step may take before `MilterTimeout`, unless an opener is given ``timeout=``."""

_RECEIVE_SIZE = 256 * 1024

_C = CommandCode
_CODE_OF_STAGE: dict[MacroStage, int] = {
    MacroStage.CONNECT: _C.CONNECT,
    MacroStage.HELO: _C.HELO,
    MacroStage.MAIL: _C.MAIL,
    MacroStage.RCPT: _C.RCPT,
    MacroStage.DATA: _C.DATA,
    MacroStage.EOH: _C.EOH,
    MacroStage.EOM: _C.EOM,
}
_FAMILY: dict[SocketFamily, AddressFamily] = {
    SocketFamily.INET: AddressFamily.INET,
    SocketFamily.INET6: AddressFamily.INET6,
    SocketFamily.UNIX: AddressFamily.UNIX,
}
# Steps that belong to an open message (MAIL opens it and is not one of them).
_IN_MESSAGE = frozenset({_C.RCPT, _C.DATA, _C.HEADER, _C.EOH, _C.BODY, _C.EOM})
# Steps whose decisive reply ends the message (the engine knows which do).
_MESSAGE_LEVEL = frozenset({_C.MAIL, _C.RCPT, _C.DATA, _C.HEADER, _C.EOH, _C.BODY})
_CONNECTION_LEVEL = frozenset({_C.CONNECT, _C.HELO})
_DECISIVE = frozenset({Status.ACCEPT, Status.REJECT, Status.TEMPFAIL, Status.DISCARD})


class MilterClient:
    """A simulated MTA session with one milter; get one from an ``open_*`` function.

    Each step method sends one command (preceded by a macro packet when
    ``macros`` is given) and returns the milter's `StepReply`; `eom` returns
    an `EomReply` with the changes. Call them in SMTP order: `connect`,
    `helo`, then per message `mail`, `rcpt`..., `data`, `header`..., `eoh`,
    `body`..., `eom` (or `abort`), and finally `close` (done on leaving the
    ``async with`` block if you do not).

    Errors: a milter that breaks the protocol raises `RemoteProtocolError`
    (`MilterClosed` if it hung up); one that does not answer within
    ``timeout`` seconds raises `MilterTimeout`. Either ends the session.
    A step the session does not allow now (``rcpt`` before ``mail``) raises
    `LocalProtocolError` and sends nothing.
    """

    timeout: float
    """Seconds each step may take (a progress packet at end of message restarts it)."""

    def __init__(self, stream: trio.abc.Stream, *, timeout: float, settle: bool = False) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.timeout = timeout
        self._stream = stream
        self._conn = MtaConnection()
        self._incoming_send, self._incoming = trio.open_memory_channel[bytes](math.inf)
        self._eof = False
        self._settle = settle
        self._broken: BaseException | None = None
        self._closed = False
        self._skipping = False
        self._message_verdict: Status | None = None
        self._connection_verdict: Status | None = None

    # --- what was negotiated ----------------------------------------------------------

    @property
    def negotiated(self) -> Negotiated:
        """The engine's record of the negotiation (version, actions, opts, macros)."""
        negotiated = self._conn.negotiated
        if negotiated is None:
            raise LocalProtocolError("the session is not negotiated yet")
        return negotiated

    @property
    def negotiated_actions(self) -> Actions:
        """The actions the milter asked for (and this client granted)."""
        return self.negotiated.actions

    @property
    def negotiated_opts(self) -> ProtocolOpts:
        """The protocol steps the milter asked for (and this client granted)."""
        return self.negotiated.opts

    @property
    def requested_macros(self) -> dict[MacroStage, list[str]]:
        """The macro names the milter asked for, per stage (``{MAIL: ["{auth_authen}"]}``)."""
        return {
            stage: to_text(names).split() for stage, names in sorted(self.negotiated.macros.items())
        }

    # --- the steps --------------------------------------------------------------------------

    async def connect(
        self, hostname: Text, address: Address = None, *, macros: Macros | None = None
    ) -> StepReply:
        """CONNECT: the SMTP client's host name (``"[192.0.2.1]"`` if unknown) and address."""
        return await self._step(connect_command(hostname, address), macros)

    async def helo(self, hostname: Text, *, macros: Macros | None = None) -> StepReply:
        """HELO/EHLO (inside a message it first ends the message, like libmilter)."""
        self._message_verdict = None
        self._skipping = False
        return await self._step(Helo(_bytes(hostname)), macros)

    async def mail(
        self, sender: Text, *esmtp_args: Text, macros: Macros | None = None
    ) -> StepReply:
        """MAIL FROM: ``sender`` as the client gave it (``"<a@example.org>"``, ``"<>"``)."""
        self._message_verdict = None
        self._skipping = False
        return await self._step(Mail((_bytes(sender), *map(_bytes, esmtp_args))), macros)

    async def rcpt(
        self, recipient: Text, *esmtp_args: Text, macros: Macros | None = None
    ) -> StepReply:
        """RCPT TO: ``recipient`` as the client gave it (``"<b@example.org>"``)."""
        return await self._step(Rcpt((_bytes(recipient), *map(_bytes, esmtp_args))), macros)

    async def data(self, *, macros: Macros | None = None) -> StepReply:
        """DATA: the message's content follows."""
        return await self._step(DATA, macros)

    async def header(self, name: Text, value: Text, *, macros: Macros | None = None) -> StepReply:
        """One header, ``value`` exactly as the milter is to see it.

        Folded lines are joined by ``\\n``. An MTA strips the one space after
        the colon unless ``HEADER_LEADING_SPACE`` was negotiated; this client
        sends ``value`` as given either way.
        """
        return await self._step(Header(_bytes(name), _bytes(value)), macros)

    async def eoh(self, *, macros: Macros | None = None) -> StepReply:
        """End of headers."""
        return await self._step(END_OF_HEADERS, macros)

    async def body(self, chunk: Text, *, macros: Macros | None = None) -> StepReply:
        """A piece of the body (CRLF line endings, as on the wire).

        Like an MTA, more than 65535 bytes are sent in several chunks; the
        reply is the last one received (sending stops at the first that is
        not CONTINUE).
        """
        data = _bytes(chunk)
        pieces = [data[i : i + CHUNK_SIZE] for i in range(0, len(data), CHUNK_SIZE)] or [b""]
        reply = StepReply(Status.CONTINUE, sent=False)
        for piece in pieces:
            reply = await self._step(Body(piece), macros)
            macros = None
            if not reply.sent or reply.status not in (Status.CONTINUE, Status.NOREPLY):
                break
        return reply

    async def eom(self, *, macros: Macros | None = None) -> EomReply:
        """End of message: the final status and the changes the milter made."""
        reply = await self._step(EndOfMessage(), macros)
        assert isinstance(reply, EomReply)
        return reply

    async def abort(self) -> None:
        """ABORT: the current message is abandoned (Postfix sends one after every message)."""
        self._message_verdict = None
        self._skipping = False
        if self._connection_verdict is None:
            await self._send_only(ABORT)

    async def unknown(self, command: Text, *, macros: Macros | None = None) -> StepReply:
        """UNKNOWN: an SMTP command the MTA does not know, as the client sent it."""
        return await self._step(Unknown(_bytes(command)), macros)

    async def macros(self, stage: MacroStage | CommandCode | str, macros: Macros) -> None:
        """Send a macro packet for ``stage`` (a `MacroStage` or a command code like ``"M"``)."""
        await self._send_only(DefineMacros(_stage_code(stage), _pairs(macros)))

    async def quit_new_connection(self) -> None:
        """QUIT_NC (``K``): end this SMTP connection; a new `connect` follows on the socket."""
        await self._send_only(QUIT_NEW_CONNECTION)
        self._connection_verdict = self._message_verdict = None
        self._skipping = False

    async def close(self) -> None:
        """QUIT: end the session and wait for the milter to close the connection.

        Anything the milter sends instead is a protocol error. Does nothing if
        already closed or if the session ended with an error.
        """
        if self._closed or self._broken is not None:
            return

        async def quit(scope: trio.CancelScope) -> None:
            await self._settle_and_check(allow_eof=True)
            data = self._conn.send(QUIT)
            self._closed = True
            with contextlib.suppress(trio.BrokenResourceError):
                await self._stream.send_all(data)  # if it hung up first: fine, QUIT asks that
            while (chunk := await self._receive()) is not None:
                self._conn.receive_data(chunk)
                self._conn.next_event()  # raises: no reply is due

        await self._guard("QUIT", quit, "the milter did not close the connection after QUIT")

    async def send_message(
        self,
        sender: Text,
        recipients: Text | Iterable[Text],
        headers: Mapping[str, Text] | Mapping[bytes, Text] | Iterable[tuple[Text, Text]] = (),
        body: Text = b"",
    ) -> EomReply:
        """Run one whole message: MAIL, RCPT..., DATA, headers, EOH, body, EOM.

        Returns the end-of-message reply. When the milter decided earlier,
        the rest is not sent and the reply says so (``sent=False``, the
        decision's status); when it refused every recipient, the message is
        aborted like an MTA would (no valid recipients).
        """
        await self.mail(sender)
        if isinstance(recipients, str | bytes):
            recipients = [recipients]
        refusal: StepReply | None = None
        accepted = False
        for recipient in recipients:
            reply = await self.rcpt(recipient)
            if reply.sent and reply.status in (Status.REJECT, Status.TEMPFAIL):
                refusal = reply
            else:
                accepted = True
        if refusal is not None and not accepted:
            await self.abort()
            return EomReply(refusal.status, refusal.text, sent=False)
        await self.data()
        pairs = headers.items() if isinstance(headers, Mapping) else headers
        for name, value in pairs:
            await self.header(name, value)
        await self.eoh()
        if body:
            await self.body(body)
        return await self.eom()

    # --- machinery ------------------------------------------------------------------------------

    async def _step(self, command: Command, macros: Macros | None) -> StepReply:
        code = command.code

        async def step(scope: trio.CancelScope) -> StepReply:
            await self._settle_and_check()
            skipped = self._not_sent(code)
            if skipped is not None:
                return skipped
            prefix = b""
            if macros is not None:
                prefix = self._conn.send(DefineMacros(code, _pairs(macros)))
            if self._conn.is_disabled(code):
                # Postfix sends the macros of disabled stages all the same (§10.4).
                if prefix:
                    await self._send(prefix)
                return StepReply(Status.CONTINUE, sent=False)
            data = prefix + self._conn.send(command)
            final, changes, progress = await self._exchange(data, scope, code)
            return self._reply(code, final, changes, progress)

        return await self._guard(command_name(code), step)

    async def _send_only(self, command: Command) -> None:
        """Send a command that gets no reply (abort, macros, quit-new-connection)."""

        async def send(scope: trio.CancelScope) -> None:
            await self._settle_and_check()
            await self._send(self._conn.send(command))

        await self._guard(command_name(command.code), send)

    async def _guard(
        self,
        what: str,
        run: Callable[[trio.CancelScope], Awaitable[T]],
        timeout_message: str | None = None,
    ) -> T:
        """Run one step under the timeout; any failure but misuse ends the session."""
        if self._broken is not None:
            raise LocalProtocolError(
                f"cannot send {what}: the session ended with an error ({self._broken!r})"
            )
        if self._closed:
            raise LocalProtocolError(f"cannot send {what}: the session is closed")
        try:
            with trio.fail_after(self.timeout) as scope:
                result = await run(scope)
        except trio.TooSlowError:
            message = timeout_message or f"no reply from the milter to {what}"
            error = MilterTimeout(f"{message} within {self.timeout} s")
            self._broken = error
            raise error from None
        except LocalProtocolError:
            raise  # refused before anything was sent: the session goes on
        except BaseException as exc:
            self._broken = exc
            raise
        return result

    async def _settle_and_check(self, *, allow_eof: bool = False) -> None:
        """Report what the milter sent when nothing was due, or that it hung up."""
        if self._settle:
            await trio.testing.wait_all_tasks_blocked()
        while not self._eof:
            try:
                data = self._incoming.receive_nowait()
            except trio.WouldBlock:
                break
            except trio.EndOfChannel:
                self._eof = True
                break
            self._conn.receive_data(data)
        if self._conn.awaiting is None:
            self._conn.next_event()  # a complete packet now is an unsolicited reply: raises
        if self._eof and not allow_eof:
            raise MilterClosed("the milter closed the connection")

    def _not_sent(self, code: int) -> StepReply | None:
        """The reply for a step a real MTA would not send now, else None."""
        eom = code == _C.EOM
        status = self._connection_verdict if code != _C.CONNECT else None
        if status is None and code in _IN_MESSAGE:
            status = self._message_verdict
            if code == _C.BODY and status is None and self._skipping:
                status = Status.SKIP
        if status is None:
            return None
        if eom:
            self._message_verdict = None
            self._skipping = False
            return EomReply(status, sent=False)
        return StepReply(status, sent=False)

    def _reply(
        self, code: int, final: WireReply | None, changes: list[Modification], progress: int
    ) -> StepReply:
        if code == _C.EOM:
            self._message_verdict = None
            self._skipping = False
            assert final is not None  # end of message always gets a reply
            if final.code == ReplyCode.SHUTDOWN:
                self._connection_verdict = Status.TEMPFAIL
            text = step_reply(final).text
            return EomReply(
                status_of(final),
                text,
                raw=final,
                modifications=modifications_of(changes),
                progress=progress,
            )
        if final is None:
            return StepReply(Status.NOREPLY)
        reply = step_reply(final)
        status = reply.status
        if final.code == ReplyCode.SHUTDOWN or (code in _CONNECTION_LEVEL and status in _DECISIVE):
            self._connection_verdict = status
        elif status is Status.SKIP:
            self._skipping = True
        elif code in _MESSAGE_LEVEL and status in _DECISIVE and self._decides_message(code, status):
            self._message_verdict = status
        return reply

    def _decides_message(self, code: int, status: Status) -> bool:
        """Whether an MTA ends the message on ``status`` at step ``code``.

        At RCPT, REJECT and TEMPFAIL are about that recipient; ACCEPT and
        DISCARD are about the whole message (protocol.md §6): Postfix and
        Sendmail send nothing more of it.
        """
        if code == _C.RCPT:
            return status in (Status.ACCEPT, Status.DISCARD)
        return True

    async def _exchange(
        self, data: bytes, scope: trio.CancelScope, code: int
    ) -> tuple[WireReply | None, list[Modification], int]:
        """Send ``data``; collect the changes and the final reply, if one is due."""
        await self._send(data)
        changes: list[Modification] = []
        progress = 0
        while self._conn.awaiting is not None:
            reply = await self._next_reply(code)
            if self._conn.awaiting is None:
                await self._settle_and_check()  # e.g. two replies in one write
                return reply, changes, progress
            if isinstance(reply, Progress):
                progress += 1
                scope.deadline = trio.current_time() + self.timeout
            else:
                assert isinstance(reply, Modification)  # the engine allows nothing else
                changes.append(reply)
        return None, changes, progress

    async def _next_reply(self, code: int) -> WireReply:
        while True:
            event = self._conn.next_event()
            if not isinstance(event, NeedData):
                return event
            data = await self._receive()
            if data is None:
                raise MilterClosed(
                    f"the milter closed the connection; the reply to {command_name(code)} "
                    "was still pending"
                )
            self._conn.receive_data(data)

    async def _send(self, data: bytes) -> None:
        try:
            await self._stream.send_all(data)
        except trio.BrokenResourceError as exc:
            raise MilterClosed("the milter closed the connection") from exc

    async def _receive(self) -> bytes | None:
        """The next received bytes, or None at end of stream."""
        if self._eof:
            return None
        try:
            return await self._incoming.receive()
        except trio.EndOfChannel:
            self._eof = True
            return None

    async def _read(self) -> None:
        """The reader task: received bytes into the channel until end of stream."""
        async with self._incoming_send:
            try:
                while data := await self._stream.receive_some(_RECEIVE_SIZE):
                    self._incoming_send.send_nowait(bytes(data))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # reported as end of stream: the milter is gone either way

    async def _negotiate(self, offer: OptionNegotiation) -> None:
        async def run(scope: trio.CancelScope) -> None:
            await self._exchange(self._conn.send(offer), scope, offer.code)

        await self._guard("OPTNEG", run)


def connect_command(hostname: Text, address: Address) -> Connect:
    """The CONNECT command for a host name and an `Address`."""
    host = _bytes(hostname)
    if address is None:
        return Connect(host, AddressFamily.UNKNOWN)
    if isinstance(address, SocketInfo):
        return Connect(host, _FAMILY[address.family], address.port, _bytes(address.address))
    if isinstance(address, tuple):
        ip, port = address[0], address[1]
        # Accept the forms MTAs use for IPv6 too (protocol.md §2.1), sent as given.
        bare = ip[5:] if ip[:5].lower() == "ipv6:" else ip
        try:
            version = ipaddress.ip_address(bare.strip("[]")).version
        except ValueError:
            raise ValueError(
                f"connect address {ip!r} is not an IP address; give (ip, port), "
                "a UNIX socket path, a SocketInfo, or None"
            ) from None
        family = AddressFamily.INET if version == 4 else AddressFamily.INET6
        return Connect(host, family, port, ip.encode("ascii"))
    return Connect(host, AddressFamily.UNIX, 0, os.fsencode(address))


def _bytes(value: Text) -> bytes:
    return to_bytes(value) if isinstance(value, str) else bytes(value)


def _pairs(macros: Macros) -> tuple[tuple[bytes, bytes], ...]:
    return tuple((_bytes(name), _bytes(value)) for name, value in macros.items())


def _stage_code(stage: MacroStage | CommandCode | str) -> int:
    if isinstance(stage, MacroStage):
        return _CODE_OF_STAGE[stage]
    if isinstance(stage, CommandCode):
        return stage
    if len(stage) != 1:
        raise ValueError(f"macro stage {stage!r}: give a MacroStage or a command code like 'M'")
    return ord(stage)
