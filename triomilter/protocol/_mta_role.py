"""The engine in the MTA role: commands out, replies in, no I/O.

Powers the testing client and the benchmarks. It is strict where MTAs differ
(Sendmail's rules, protocol.md §6): a milter that passes it works with both.
"""

from __future__ import annotations

import struct

from ._commands import Command, OptionNegotiation
from ._constants import (
    MAX_DATA_SIZE,
    NO_FLAG,
    CommandCode,
    ProtocolOpts,
    ReplyCode,
    command_name,
    reply_name,
)
from ._errors import LocalProtocolError, RemoteProtocolError
from ._framing import NEED_DATA, FrameReader, NeedData
from ._negotiation import Negotiated, check_reply
from ._replies import REPLY_DECODERS, OptionNegotiationReply, Reply
from ._state import FINAL_REPLIES, SessionState, State


class MtaConnection:
    """One MTA-side session: what an MTA may send next, what it must accept.

    `send` validates a command against the session (order, stages the milter
    disabled with ``NO_*``, a reply still pending) and returns its bytes;
    `next_event` yields the milter's replies, checked against the command
    they answer. `awaiting` is the code of the command whose final reply is
    pending; commands whose ``NOREPLY_*`` step was negotiated await nothing.
    A `RemoteProtocolError` (the milter sent something invalid) is final:
    every later `next_event` raises again.
    """

    __slots__ = ("_failure", "_offer", "_reader", "_session", "awaiting", "negotiated")

    def __init__(self, max_data_size: int = MAX_DATA_SIZE) -> None:
        self._reader = FrameReader(max_data_size)
        self._session = SessionState()
        self._offer: OptionNegotiation | None = None
        self._failure: RemoteProtocolError | None = None
        self.negotiated: Negotiated | None = None
        self.awaiting: int | None = None

    @property
    def state(self) -> State:
        """Where the session is (`State.ERROR` after a protocol error, which is final)."""
        return self._session.state

    @property
    def in_message(self) -> bool:
        """Whether a message is open (between MAIL and its end)."""
        return self._session.in_message

    def is_disabled(self, code: int) -> bool:
        """Whether the milter asked (``NO_*``) not to be sent command ``code``."""
        flag = NO_FLAG.get(code)
        return bool(flag and self.negotiated and self.negotiated.opts & flag)

    def expects_reply(self, code: int) -> bool:
        """Whether command ``code`` gets a reply in this session."""
        return self._session.expects_reply(code)

    def send(self, command: Command) -> bytes:
        """Validate ``command`` and return its bytes."""
        code = command.code
        if self.awaiting is not None:
            raise LocalProtocolError(
                f"cannot send {command_name(code)}: the reply to "
                f"{command_name(self.awaiting)} is still pending"
            )
        # Encode before any state changes: a command that cannot be encoded (a
        # NUL in a string, a port out of range) must leave the session as it was.
        try:
            wire = command.encode()
        except (ValueError, struct.error) as exc:
            raise LocalProtocolError(f"{command_name(code)}: cannot be encoded: {exc}") from None
        if code == CommandCode.MACRO:
            if self._session.state in (State.NEGOTIATE, State.CLOSED, State.ERROR):
                raise LocalProtocolError(f"cannot send macros {self._session.state.value}")
            return wire
        if self.is_disabled(code):
            raise LocalProtocolError(
                f"the milter negotiated not to receive {command_name(code)} (NO_* step)"
            )
        before = self._session.state
        if self._session.command(code) is None:
            expected = ", ".join(self._session.expected())
            raise LocalProtocolError(
                f"cannot send {command_name(code)} {before.value}; expected one of: {expected}"
            )
        if isinstance(command, OptionNegotiation):
            self._offer = command
        if self._session.expects_reply(code):
            self.awaiting = code
            self._session.body_run = 0
        return wire

    def receive_data(self, data: bytes | bytearray) -> None:
        """Add bytes received from the milter; `next_event` then returns the replies in them."""
        self._reader.feed(data)

    def next_event(self) -> Reply | NeedData:
        """The next reply from the milter, or `NEED_DATA`."""
        if self._failure is not None:
            raise RemoteProtocolError(f"the session already failed: {self._failure}")
        try:
            return self._next_reply()
        except RemoteProtocolError as exc:
            self._failure = exc
            self._session.failed()
            raise

    def _next_reply(self) -> Reply | NeedData:
        frame = self._reader.next_frame()
        if frame is None:
            return NEED_DATA
        code, payload = frame
        decoder = REPLY_DECODERS.get(code)
        if decoder is None:
            raise RemoteProtocolError(f"{reply_name(code)} is not a reply a milter may send")
        try:
            reply = decoder(payload)
        except (IndexError, ValueError) as exc:
            raise RemoteProtocolError(f"{reply_name(code)}: malformed ({exc})") from exc
        awaiting = self.awaiting
        if awaiting is None:
            raise RemoteProtocolError(f"unsolicited {reply_name(code)}: no reply was expected")
        if code in FINAL_REPLIES[awaiting]:
            self._final(awaiting, reply)
            return reply
        actions = self.negotiated.actions if self.negotiated is not None else 0
        refusal = self._session.change(awaiting, code, actions)
        if refusal is not None:
            raise RemoteProtocolError(f"{reply_name(code)} {refusal}")
        return reply

    def _final(self, awaiting: int, reply: Reply) -> None:
        code = reply.code
        if code == ReplyCode.OPTNEG:
            assert isinstance(reply, OptionNegotiationReply) and self._offer is not None
            self.negotiated = check_reply(self._offer, reply)
            self._session.negotiated(self.negotiated.opts)
        elif code == ReplyCode.SKIP and not (
            self.negotiated and self.negotiated.opts & ProtocolOpts.SKIP
        ):
            raise RemoteProtocolError("SKIP ('s') reply, but SKIP was not negotiated")
        elif code == ReplyCode.REPLYCODE:
            text = reply.text  # type: ignore[union-attr]
            if text[:1] not in (b"4", b"5"):
                raise RemoteProtocolError(f"REPLYCODE ('y') is not a 4xx/5xx reply: {text!r}")
        else:
            self._session.final_reply(awaiting, code)
        if code == ReplyCode.REPLYCODE:
            self._session.final_reply(awaiting, code)
        self.awaiting = None
