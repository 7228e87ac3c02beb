"""The engine in the milter role: commands in, replies out, no I/O."""

from __future__ import annotations

import struct

from ._commands import ABORT, COMMAND_DECODERS, Command, OptionNegotiation
from ._constants import MAX_DATA_SIZE, CommandCode, ReplyCode, command_name, reply_name
from ._errors import LocalProtocolError, RemoteProtocolError
from ._framing import NEED_DATA, FrameReader, NeedData
from ._macros import MESSAGE_SLOT, SLOT_OF_CODE, MacroStore
from ._negotiation import Negotiated, check_reply
from ._replies import OptionNegotiationReply, Reply
from ._state import ABORTS, FINAL_REPLIES, IGNORED, REPLYING_COMMANDS, SessionState, State

# Commands that reset the macro sets of every later stage when they arrive.
_SCOPING = {
    code: slot
    for code, slot in SLOT_OF_CODE.items()
    if code in (CommandCode.CONNECT, CommandCode.HELO, CommandCode.MAIL, CommandCode.RCPT)
}
_MACRO = int(CommandCode.MACRO)
_CONTINUE = int(ReplyCode.CONTINUE)
_SKIP = int(ReplyCode.SKIP)
_EOM = int(CommandCode.EOM)
_ABORT = int(CommandCode.ABORT)
_QUIT = int(CommandCode.QUIT)
_QUIT_NC = int(CommandCode.QUIT_NC)
_OPTNEG = int(CommandCode.OPTNEG)
_REPLYING = frozenset(int(code) for code in REPLYING_COMMANDS)
_SKIP_BIT = 0x400  # ProtocolOpts.SKIP as a plain int (IntFlag operators run in Python)


class MilterConnection:
    """One milter-side session over one socket.

    Feed received bytes with `receive_data`, take commands from `next_event`
    until it returns `NEED_DATA`; answer every command that owes a reply
    (`owed` is its code) with `send`, which returns the bytes to write.
    Macro packets are absorbed into `macros`; ignored quirks (Postfix's empty
    and disabled-stage macro packets, repeated aborts) never surface.

    `RemoteProtocolError` means the MTA sent something this session cannot
    accept; it is final: the session is then in `State.ERROR` and
    `next_event` raises again. `LocalProtocolError` means the caller broke
    the rules (a reply nobody owed, a reply not allowed for the command, an
    action not negotiated); it changes nothing.
    """

    __slots__ = (
        "_clear_from",
        "_failure",
        "_offer",
        "_pending",
        "_reader",
        "_session",
        "macros",
        "negotiated",
        "owed",
    )

    def __init__(self, max_data_size: int = MAX_DATA_SIZE) -> None:
        self._reader = FrameReader(max_data_size)
        self._session = SessionState()
        self._pending: Command | None = None
        self._offer: OptionNegotiation | None = None
        self._clear_from = -1
        self._failure: RemoteProtocolError | None = None
        self.macros = MacroStore()
        self.negotiated: Negotiated | None = None
        self.owed: int | None = None
        """The code of the command whose final reply is owed, if any."""

    # --- state --------------------------------------------------------------

    @property
    def state(self) -> State:
        """Where the session is (`State.ERROR` after a protocol error, which is final)."""
        return self._session.state

    @property
    def in_message(self) -> bool:
        """Whether a message is open (between MAIL and its end)."""
        return self._session.in_message

    @property
    def buffered(self) -> int:
        """Received bytes that are not yet a complete command."""
        return self._reader.buffered

    @property
    def partial_frame(self) -> int | None:
        """Where the packet still being received began (see `FrameReader.partial_frame`)."""
        return self._reader.partial_frame

    @property
    def max_data_size(self) -> int:
        """The largest packet accepted, in data bytes; a larger one is a protocol error."""
        return self._reader.max_data_size

    # --- receiving -----------------------------------------------------------

    def receive_data(self, data: bytes | bytearray) -> None:
        """Add bytes received from the MTA; `next_event` then returns the commands in them."""
        self._reader.feed(data)

    def next_event(self) -> Command | NeedData:
        """The next command to act on, or `NEED_DATA`."""
        if self.owed is not None:
            raise LocalProtocolError(
                f"next_event() while the reply to {command_name(self.owed)} is still owed"
            )
        if self._failure is not None:
            raise RemoteProtocolError(f"the session already failed: {self._failure}")
        if self._clear_from >= 0:
            # Macros of an ended message or connection are dropped only now, so
            # that the abort/close handlers could still read them (libmilter
            # runs those callbacks before it forgets the macros).
            self.macros.clear_from(self._clear_from)
            self._clear_from = -1
        pending = self._pending
        if pending is not None:
            self._pending = None
            self._owe(pending.code)
            return pending
        try:
            return self._next_command()
        except RemoteProtocolError as exc:
            self._failure = exc
            self._session.failed()
            raise

    def _next_command(self) -> Command | NeedData:  # noqa: C901 - the hot loop, inline on purpose
        reader = self._reader
        while True:
            frame = reader.next_frame()
            if frame is None:
                return NEED_DATA
            code, payload = frame
            if code == _MACRO:
                state = self._session.state
                if state is State.NEGOTIATE or state is State.CLOSED:
                    raise self._unexpected(_MACRO)
                self.macros.define(payload)
                continue
            decoder = COMMAND_DECODERS.get(code)
            if decoder is None:
                raise RemoteProtocolError(
                    f"{command_name(code)} is not a milter command ({self.state.value})"
                )
            # Decoded before the state moves: a malformed command changes nothing.
            try:
                event = decoder(payload)
            except (IndexError, ValueError) as exc:  # belt and braces: never leak these
                raise RemoteProtocolError(f"{command_name(code)}: malformed ({exc})") from exc
            before = self._session.state
            flags = self._session.command(code)
            if flags is None:
                raise self._unexpected(code, before)
            if flags & IGNORED:
                continue
            scope = _SCOPING.get(code)
            if scope is not None:
                self.macros.clear_after(scope)
            if flags & ABORTS:
                # An open message ends first: deliver an abort, then the command
                # itself (libmilter's order for an unexpected MAIL, HELO, QUIT).
                # The message's macros are already gone for MAIL and HELO (the
                # scoping above keeps the D M that came with this MAIL); QUIT and
                # K clear all once delivered.
                self._pending = event
                return ABORT
            if code in _REPLYING and code not in self._session.silent:
                # Inline `_owe` for the common case: a command owing a reply.
                self.owed = code
                self._session.body_run = 0
                if code == _OPTNEG:
                    assert isinstance(event, OptionNegotiation)
                    self._offer = event
            else:
                self._owe(code)
            return event

    def _owe(self, code: int) -> None:
        """Record what delivering command ``code`` means for replies and macros."""
        session = self._session
        if session.expects_reply(code):
            self.owed = code
            session.body_run = 0
        elif code == _ABORT:
            self._clear_from = MESSAGE_SLOT
        elif code in (_QUIT, _QUIT_NC):
            self._clear_from = 0

    def _unexpected(self, code: int, state: State | None = None) -> RemoteProtocolError:
        state = state or self._session.state
        expected = ", ".join(self._session.expected())
        return RemoteProtocolError(
            f"unexpected {command_name(code)} {state.value}; expected one of: {expected}"
        )

    # --- sending -------------------------------------------------------------

    def send(self, reply: Reply) -> bytes:
        """Validate ``reply`` against the owed command and return its bytes."""
        owed = self.owed
        code = reply.code
        if code == _CONTINUE and owed is not None and owed != _EOM and owed != _OPTNEG:
            # The common case (every stage of every message): valid everywhere
            # but negotiation, changes no state, its bytes are precomputed.
            self.owed = None
            return reply.encode()
        if owed is None:
            raise LocalProtocolError(f"{reply_name(code)}: no reply is owed now")
        # Encode before any state changes: a reply that cannot be encoded (a NUL
        # in a string, an index out of range) must leave the session as it was.
        try:
            wire = reply.encode()
        except (ValueError, struct.error) as exc:
            raise LocalProtocolError(f"{reply_name(code)}: cannot be encoded: {exc}") from None
        session = self._session
        if code in FINAL_REPLIES[owed]:
            if code == _SKIP and not self._opts() & _SKIP_BIT:
                raise LocalProtocolError("SKIP was not negotiated")
            if code == ReplyCode.OPTNEG:
                assert isinstance(reply, OptionNegotiationReply)
                return self._send_negotiation(reply)
            self.owed = None
            session.final_reply(owed, code)
            if owed == _EOM or not session.in_message:
                self.macros.clear_from(MESSAGE_SLOT)
            return wire
        negotiated = self.negotiated
        refusal = session.change(owed, code, negotiated.actions if negotiated else 0)
        if refusal is not None:
            raise LocalProtocolError(f"{reply_name(code)} {refusal}")
        return wire

    def _opts(self) -> int:
        return self.negotiated.opts if self.negotiated is not None else 0

    def _send_negotiation(self, reply: OptionNegotiationReply) -> bytes:
        assert self._offer is not None
        try:
            negotiated = check_reply(self._offer, reply)
        except RemoteProtocolError as exc:
            raise LocalProtocolError(str(exc)) from None
        return self.accept_negotiation(negotiated, reply)

    def accept_negotiation(
        self, negotiated: Negotiated, reply: OptionNegotiationReply | None = None
    ) -> bytes:
        """Record ``negotiated`` as the session's agreement and return the ``O`` reply.

        Keeps ``faked_noreply`` (unlike a reply on the wire, which cannot carry it).
        """
        if self.owed != CommandCode.OPTNEG:
            raise LocalProtocolError("no option negotiation is waiting for its reply")
        self.negotiated = negotiated
        self.owed = None
        self._session.negotiated(negotiated.opts)
        return (reply or negotiated.reply()).encode()


__all__ = ["NEED_DATA", "MilterConnection", "NeedData"]
