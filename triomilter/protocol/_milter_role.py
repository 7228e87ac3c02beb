"""The engine in the milter role: commands in, replies out, no I/O."""

from __future__ import annotations

import struct

from ._commands import (
    ABORT,
    COMMAND_DECODERS,
    Command,
    OptionNegotiation,
)
from ._constants import (
    ACTION_OF_REPLY,
    MAX_DATA_SIZE,
    NO_FLAG,
    NOREPLY_FLAG,
    CommandCode,
    ProtocolOpts,
    ReplyCode,
    command_name,
    reply_name,
)
from ._errors import LocalProtocolError, RemoteProtocolError
from ._framing import FrameReader
from ._macros import MESSAGE_SLOT, SLOT_OF_CODE, MacroStore
from ._negotiation import Negotiated, check_reply
from ._replies import OptionNegotiationReply, Reply
from ._state import (
    ABORTS,
    EOM_MODIFICATIONS,
    FINAL_REPLIES,
    IGNORED,
    REPLYING_COMMANDS,
    SessionState,
    State,
    body_run,
)


class NeedData:
    """Returned by ``next_event`` when a whole command has not arrived yet."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()

# Commands that reset the macro sets of every later stage when they arrive.
_SCOPING = {
    code: slot
    for code, slot in SLOT_OF_CODE.items()
    if code in (CommandCode.CONNECT, CommandCode.HELO, CommandCode.MAIL, CommandCode.RCPT)
}
_MACRO = int(CommandCode.MACRO)
_NOREPLY_BITS = tuple((int(code), int(flag)) for code, flag in NOREPLY_FLAG.items())
_NO_BITS = tuple((int(code), int(flag)) for code, flag in NO_FLAG.items())
_NO_CONNECT_BIT = int(ProtocolOpts.NO_CONNECT)
_CONTINUE = int(ReplyCode.CONTINUE)
_EOM = int(CommandCode.EOM)
_ABORT = int(CommandCode.ABORT)
_QUIT = int(CommandCode.QUIT)
_QUIT_NC = int(CommandCode.QUIT_NC)
_OPTNEG = int(CommandCode.OPTNEG)
_REPLYING = frozenset(int(code) for code in REPLYING_COMMANDS if code != CommandCode.OPTNEG)


class MilterConnection:
    """One milter-side session over one socket.

    Feed received bytes with `receive_data`, take commands from `next_event`
    until it returns `NEED_DATA`; answer every command that owes a reply
    (`owed` is its code) with `send`, which returns the bytes to write.
    Macro packets are absorbed into `macros`; ignored quirks (Postfix's empty
    and disabled-stage macro packets, repeated aborts) never surface.

    `RemoteProtocolError` means the MTA sent something this session cannot
    accept; `LocalProtocolError` means the caller broke the rules (a reply
    nobody owed, a reply not allowed for the command, an action not
    negotiated).
    """

    __slots__ = (
        "_body_run",
        "_clear_from",
        "_offer",
        "_pending",
        "_reader",
        "_session",
        "_silent",
        "macros",
        "negotiated",
        "owed",
    )

    def __init__(self, max_data_size: int = MAX_DATA_SIZE) -> None:
        self._reader = FrameReader(max_data_size)
        self._session = SessionState()
        self._pending: Command | None = None
        self._silent: frozenset[int] = frozenset()
        self._offer: OptionNegotiation | None = None
        self._body_run = 0
        self._clear_from = -1
        self.macros = MacroStore()
        self.negotiated: Negotiated | None = None
        self.owed: int | None = None
        """The code of the command whose final reply is owed, if any."""

    # --- state --------------------------------------------------------------

    @property
    def state(self) -> State:
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
    def max_data_size(self) -> int:
        return self._reader.max_data_size

    # --- receiving -----------------------------------------------------------

    def receive_data(self, data: bytes | bytearray) -> None:
        self._reader.feed(data)

    def next_event(self) -> Command | NeedData:
        """The next command to act on, or `NEED_DATA`."""
        if self.owed is not None:
            raise LocalProtocolError(
                f"next_event() while the reply to {command_name(self.owed)} is still owed"
            )
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
        reader = self._reader
        session = self._session
        macros = self.macros
        while True:
            frame = reader.next_frame()
            if frame is None:
                return NEED_DATA
            code, payload = frame
            if code == _MACRO:
                if session.state is State.NEGOTIATE or session.state is State.CLOSED:
                    raise self._unexpected(code)
                macros.define(payload)
                continue
            decoder = COMMAND_DECODERS.get(code)
            if decoder is None:
                raise RemoteProtocolError(
                    f"{command_name(code)} is not a milter command ({session.state.value})"
                )
            before = session.state
            # The main flow inline (the table); the rest through SessionState.command.
            nxt = session.table[before].get(code)
            if nxt is not None:
                session.state = nxt
                flags = 0
            else:
                flags = session.command(code)  # type: ignore[assignment]
                if flags is None:
                    raise self._unexpected(code, before)
            try:
                event = decoder(payload)
            except (IndexError, ValueError) as exc:  # belt and braces: never leak these
                raise RemoteProtocolError(f"{command_name(code)}: malformed ({exc})") from exc
            if flags:
                if flags & IGNORED:
                    continue
                if flags & ABORTS:
                    # An open message ends first: deliver an abort, then the
                    # command itself (libmilter's order for an unexpected MAIL,
                    # HELO, QUIT). The message's macros are already gone for
                    # MAIL and HELO (the scoping below clears the later stages
                    # while keeping the D M that came with this MAIL); QUIT and
                    # K clear all once delivered.
                    scope = _SCOPING.get(code)
                    if scope is not None:
                        macros.clear_after(scope)
                    self._pending = event
                    return ABORT
            scope = _SCOPING.get(code)
            if scope is not None:
                macros.clear_after(scope)
            if code in _REPLYING and code not in self._silent:
                self.owed = code
                self._body_run = 0
            elif code == _ABORT:
                self._clear_from = MESSAGE_SLOT
            elif code in (_QUIT, _QUIT_NC):
                self._clear_from = 0
            elif code == _OPTNEG:
                assert isinstance(event, OptionNegotiation)
                self._offer = event
                self.owed = code
            return event

    def _owe(self, code: int) -> None:
        if code in REPLYING_COMMANDS and code not in self._silent:
            self.owed = code
            self._body_run = 0
        elif code == CommandCode.QUIT or code == CommandCode.QUIT_NC:
            self._clear_from = 0

    def _end_message(self) -> None:
        self.macros.clear_from(MESSAGE_SLOT)

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
        if code in FINAL_REPLIES[owed]:
            if code == ReplyCode.SKIP and not self._negotiated_opts() & ProtocolOpts.SKIP:
                raise LocalProtocolError("SKIP was not negotiated")
            if code == ReplyCode.OPTNEG:
                assert isinstance(reply, OptionNegotiationReply)
                return self._send_negotiation(reply)
            self.owed = None
            self._session.final_reply(owed, code)
            if owed == _EOM or not self._session.in_message:
                self._end_message()
            return wire
        if owed == _EOM and code in EOM_MODIFICATIONS:
            needed = ACTION_OF_REPLY.get(code)
            if needed is not None:
                negotiated = self.negotiated
                if negotiated is None or not negotiated.actions & needed:
                    raise LocalProtocolError(
                        f"{reply_name(code)} needs the {needed!r} action, which was not negotiated"
                    )
            self._body_run = body_run(self._body_run, code, LocalProtocolError)
            return wire
        raise LocalProtocolError(f"{reply_name(code)} is not a valid reply to {command_name(owed)}")

    def _negotiated_opts(self) -> ProtocolOpts:
        return self.negotiated.opts if self.negotiated is not None else ProtocolOpts.NONE

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
        opts = int(negotiated.opts)  # plain ints: IntFlag operators run in Python
        self._silent = frozenset(code for code, flag in _NOREPLY_BITS if opts & flag)
        self.owed = None
        self._session.negotiated(
            bool(opts & _NO_CONNECT_BIT),
            frozenset(code for code, flag in _NO_BITS if opts & flag),
        )
        return (reply or negotiated.reply()).encode()
