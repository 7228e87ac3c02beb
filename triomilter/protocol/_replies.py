"""Replies (milter -> MTA): one immutable class per reply (protocol.md §2.2, §6, §8, §9).

Every class encodes itself (milter role) with ``encode()``; ``decode_reply``
turns a frame back into an object (MTA role). Replies without data are
singletons whose wire bytes are computed once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import attrs

from ._constants import Actions, MacroStage, ProtocolOpts, ReplyCode, reply_name
from ._errors import RemoteProtocolError
from ._wire import (
    check_string,
    exact_strings,
    no_payload,
    pack_u32,
    packet,
    split_strings,
    unpack_u32_from,
)


@attrs.frozen
class OptionNegotiationReply:
    """``O`` reply: version, actions, protocol steps and optional macro lists per stage."""

    code: ClassVar[int] = ReplyCode.OPTNEG
    version: int
    actions: Actions
    opts: ProtocolOpts
    macros: tuple[tuple[MacroStage, bytes], ...] = ()

    def encode(self) -> bytes:
        """This reply as one packet (length, code, payload), ready to send to an MTA.

        Raises `ValueError` if a string to be sent NUL-terminated contains a NUL byte.
        """
        data = pack_u32(self.version) + pack_u32(self.actions) + pack_u32(self.opts)
        for stage, names in self.macros:
            data += pack_u32(stage) + check_string(names, "macro list") + b"\0"
        return packet(self.code, data)


class _Simple:
    """A reply without data; its wire form is precomputed."""

    __slots__ = ()
    code: ClassVar[int]
    _wire: ClassVar[bytes]

    def encode(self) -> bytes:
        """This reply as one packet (length, code), ready to send to an MTA."""
        return self._wire

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self)

    def __hash__(self) -> int:
        return self.code


class Continue(_Simple):
    """``c``: go on (at end of message: accept)."""

    __slots__ = ()
    code = ReplyCode.CONTINUE
    _wire = packet(ReplyCode.CONTINUE)


class Accept(_Simple):
    """``a``: accept the connection or message without further filtering."""

    __slots__ = ()
    code = ReplyCode.ACCEPT
    _wire = packet(ReplyCode.ACCEPT)


class Reject(_Simple):
    """``r``: reject (connection, message or recipient, by stage)."""

    __slots__ = ()
    code = ReplyCode.REJECT
    _wire = packet(ReplyCode.REJECT)


class Tempfail(_Simple):
    """``t``: temporary failure (connection, message or recipient, by stage)."""

    __slots__ = ()
    code = ReplyCode.TEMPFAIL
    _wire = packet(ReplyCode.TEMPFAIL)


class Discard(_Simple):
    """``d``: accept the message and silently throw it away."""

    __slots__ = ()
    code = ReplyCode.DISCARD
    _wire = packet(ReplyCode.DISCARD)


class Skip(_Simple):
    """``s``: send no more body chunks (only if SKIP was negotiated)."""

    __slots__ = ()
    code = ReplyCode.SKIP
    _wire = packet(ReplyCode.SKIP)


class Progress(_Simple):
    """``p``: still working; resets the MTA's timeouts (end of message only)."""

    __slots__ = ()
    code = ReplyCode.PROGRESS
    _wire = packet(ReplyCode.PROGRESS)


class Shutdown(_Simple):
    """``4``: 421 and disconnect (accepted by Postfix; libmilter never sends it)."""

    __slots__ = ()
    code = ReplyCode.SHUTDOWN
    _wire = packet(ReplyCode.SHUTDOWN)


CONTINUE = Continue()
"""The `Continue` reply (replies without data need one instance each)."""
ACCEPT = Accept()
"""The `Accept` reply."""
REJECT = Reject()
"""The `Reject` reply."""
TEMPFAIL = Tempfail()
"""The `Tempfail` reply."""
DISCARD = Discard()
"""The `Discard` reply."""
SKIP = Skip()
"""The `Skip` reply."""
PROGRESS = Progress()
"""The `Progress` reply."""
SHUTDOWN = Shutdown()
"""The `Shutdown` reply."""


@attrs.frozen
class ReplyWithCode:
    """``y``: a custom SMTP reply, e.g. ``b"550 5.7.1 Go away"`` (lines joined by CRLF)."""

    code: ClassVar[int] = ReplyCode.REPLYCODE
    text: bytes

    def encode(self) -> bytes:
        """This reply as one packet (length, code, payload), ready to send to an MTA.

        Raises `ValueError` if a string to be sent NUL-terminated contains a NUL byte.
        """
        return packet(self.code, check_string(self.text, "reply text") + b"\0")

    @property
    def is_permanent(self) -> bool:
        """Whether the reply is a 5xx one (else 4xx): reject rather than tempfail."""
        return self.text[:1] == b"5"


@attrs.frozen
class Quarantine:
    """``q``: put the message in the MTA's hold/quarantine queue with a reason."""

    code: ClassVar[int] = ReplyCode.QUARANTINE
    reason: bytes

    def encode(self) -> bytes:
        """This reply as one packet (length, code, payload), ready to send to an MTA.

        Raises `ValueError` if a string to be sent NUL-terminated contains a NUL byte.
        """
        return packet(self.code, check_string(self.reason, "quarantine reason") + b"\0")


@attrs.frozen
class AddHeader:
    """``h``: append a header."""

    code: ClassVar[int] = ReplyCode.ADDHEADER
    name: bytes
    value: bytes

    def encode(self) -> bytes:
        """This reply as one packet (length, code, payload), ready to send to an MTA.

        Raises `ValueError` if a string to be sent NUL-terminated contains a NUL byte.
        """
        return packet(self.code, _name_value(self.name, self.value))


@attrs.frozen
class InsertHeader:
    """``i``: insert a header at ``index`` (0 = top)."""

    code: ClassVar[int] = ReplyCode.INSHEADER
    index: int
    name: bytes
    value: bytes

    def encode(self) -> bytes:
        """This reply as one packet (length, code, payload), ready to send to an MTA.

        Raises `ValueError` if a string to be sent NUL-terminated contains a NUL byte.
        """
        return packet(self.code, pack_u32(self.index) + _name_value(self.name, self.value))


@attrs.frozen
class ChangeHeader:
    """``m``: replace the ``index``-th (1-based) header ``name``; an empty value deletes it."""

    code: ClassVar[int] = ReplyCode.CHGHEADER
    index: int
    name: bytes
    value: bytes

    def encode(self) -> bytes:
        """This reply as one packet (length, code, payload), ready to send to an MTA.

        Raises `ValueError` if a string to be sent NUL-terminated contains a NUL byte.
        """
        return packet(self.code, pack_u32(self.index) + _name_value(self.name, self.value))


@attrs.frozen
class AddRecipient:
    """``+``: add an envelope recipient."""

    code: ClassVar[int] = ReplyCode.ADDRCPT
    rcpt: bytes

    def encode(self) -> bytes:
        """This reply as one packet (length, code, payload), ready to send to an MTA.

        Raises `ValueError` if a string to be sent NUL-terminated contains a NUL byte.
        """
        return packet(self.code, check_string(self.rcpt, "recipient") + b"\0")


@attrs.frozen
class AddRecipientExt:
    """``2``: add an envelope recipient with an optional ESMTP-args string."""

    code: ClassVar[int] = ReplyCode.ADDRCPT_PAR
    rcpt: bytes
    args: bytes | None = None

    def encode(self) -> bytes:
        """This reply as one packet (length, code, payload), ready to send to an MTA.

        Raises `ValueError` if a string to be sent NUL-terminated contains a NUL byte.
        """
        return packet(self.code, _with_args(self.rcpt, self.args, "recipient"))


@attrs.frozen
class DeleteRecipient:
    """``-``: remove an envelope recipient."""

    code: ClassVar[int] = ReplyCode.DELRCPT
    rcpt: bytes

    def encode(self) -> bytes:
        """This reply as one packet (length, code, payload), ready to send to an MTA.

        Raises `ValueError` if a string to be sent NUL-terminated contains a NUL byte.
        """
        return packet(self.code, check_string(self.rcpt, "recipient") + b"\0")


@attrs.frozen
class ChangeSender:
    """``e``: replace the envelope sender, with an optional ESMTP-args string."""

    code: ClassVar[int] = ReplyCode.CHGFROM
    sender: bytes
    args: bytes | None = None

    def encode(self) -> bytes:
        """This reply as one packet (length, code, payload), ready to send to an MTA.

        Raises `ValueError` if a string to be sent NUL-terminated contains a NUL byte.
        """
        return packet(self.code, _with_args(self.sender, self.args, "sender"))


@attrs.frozen
class ReplaceBody:
    """``b``: one chunk of the replacement body (chunks are contiguous, <= 65535 bytes)."""

    code: ClassVar[int] = ReplyCode.REPLBODY
    chunk: bytes

    def encode(self) -> bytes:
        """This reply as one packet (length, code, payload), ready to send to an MTA."""
        return packet(self.code, self.chunk)


def _name_value(name: bytes, value: bytes) -> bytes:
    return check_string(name, "header name") + b"\0" + check_string(value, "header value") + b"\0"


def _with_args(first: bytes, args: bytes | None, what: str) -> bytes:
    data = check_string(first, what) + b"\0"
    if args is not None:
        data += check_string(args, "ESMTP arguments") + b"\0"
    return data


Reply = (
    OptionNegotiationReply
    | Continue
    | Accept
    | Reject
    | Tempfail
    | Discard
    | Skip
    | Progress
    | Shutdown
    | ReplyWithCode
    | Quarantine
    | AddHeader
    | InsertHeader
    | ChangeHeader
    | AddRecipient
    | AddRecipientExt
    | DeleteRecipient
    | ChangeSender
    | ReplaceBody
)
"""Any reply a milter sends: what `MilterConnection.send` takes and
`MtaConnection.next_event` returns."""

Modification = (
    Quarantine
    | AddHeader
    | InsertHeader
    | ChangeHeader
    | AddRecipient
    | AddRecipientExt
    | DeleteRecipient
    | ChangeSender
    | ReplaceBody
)
"""The end-of-message changes a milter can ask for."""


# --- decoding (MTA role) ----------------------------------------------------


def _decode_optneg(payload: bytes) -> OptionNegotiationReply:
    if len(payload) < 12:
        raise RemoteProtocolError(
            f"OPTNEG reply ('O'): expected at least 12 bytes, got {len(payload)}"
        )
    macros: list[tuple[MacroStage, bytes]] = []
    pos = 12
    while pos < len(payload):
        if len(payload) - pos < 5:
            raise RemoteProtocolError("OPTNEG reply ('O'): truncated macro list")
        stage_number = unpack_u32_from(payload, pos)[0]
        end = payload.find(b"\0", pos + 4)
        if end < 0:
            raise RemoteProtocolError("OPTNEG reply ('O'): macro list is not NUL-terminated")
        try:
            stage = MacroStage(stage_number)
        except ValueError:
            raise RemoteProtocolError(
                f"OPTNEG reply ('O'): unknown macro stage {stage_number}"
            ) from None
        macros.append((stage, payload[pos + 4 : end]))
        pos = end + 1
    return OptionNegotiationReply(
        unpack_u32_from(payload, 0)[0],
        Actions(unpack_u32_from(payload, 4)[0]),
        ProtocolOpts(unpack_u32_from(payload, 8)[0]),
        tuple(macros),
    )


def _simple_decoder(instance: _Simple) -> Callable[[bytes], Reply]:
    what = reply_name(instance.code)

    def decode(payload: bytes) -> Reply:
        no_payload(payload, what)
        return instance  # type: ignore[return-value]

    return decode


def _decode_replycode(payload: bytes) -> ReplyWithCode:
    (text,) = exact_strings(payload, 1, "REPLYCODE ('y')")
    return ReplyWithCode(text)


def _decode_quarantine(payload: bytes) -> Quarantine:
    (reason,) = exact_strings(payload, 1, "QUARANTINE ('q')")
    return Quarantine(reason)


def _decode_addheader(payload: bytes) -> AddHeader:
    name, value = exact_strings(payload, 2, "ADDHEADER ('h')")
    return AddHeader(name, value)


def _indexed_header(payload: bytes, what: str) -> tuple[int, bytes, bytes]:
    if len(payload) < 4:
        raise RemoteProtocolError(f"{what}: missing the header index")
    name, value = exact_strings(payload[4:], 2, what)
    return unpack_u32_from(payload, 0)[0], name, value


def _decode_insheader(payload: bytes) -> InsertHeader:
    return InsertHeader(*_indexed_header(payload, "INSHEADER ('i')"))


def _decode_chgheader(payload: bytes) -> ChangeHeader:
    return ChangeHeader(*_indexed_header(payload, "CHGHEADER ('m')"))


def _decode_addrcpt(payload: bytes) -> AddRecipient:
    (rcpt,) = exact_strings(payload, 1, "ADDRCPT ('+')")
    return AddRecipient(rcpt)


def _one_or_two(payload: bytes, what: str) -> tuple[bytes, bytes | None]:
    parts = split_strings(payload, what)
    if len(parts) == 1:
        return parts[0], None
    if len(parts) == 2:
        return parts[0], parts[1]
    raise RemoteProtocolError(f"{what}: expected 1 or 2 strings, got {len(parts)}")


def _decode_addrcpt_par(payload: bytes) -> AddRecipientExt:
    return AddRecipientExt(*_one_or_two(payload, "ADDRCPT_PAR ('2')"))


def _decode_delrcpt(payload: bytes) -> DeleteRecipient:
    (rcpt,) = exact_strings(payload, 1, "DELRCPT ('-')")
    return DeleteRecipient(rcpt)


def _decode_chgfrom(payload: bytes) -> ChangeSender:
    return ChangeSender(*_one_or_two(payload, "CHGFROM ('e')"))


def _decode_replbody(payload: bytes) -> ReplaceBody:
    return ReplaceBody(payload)


REPLY_DECODERS: dict[int, Callable[[bytes], Reply]] = {
    ReplyCode.OPTNEG: _decode_optneg,
    ReplyCode.CONTINUE: _simple_decoder(CONTINUE),
    ReplyCode.ACCEPT: _simple_decoder(ACCEPT),
    ReplyCode.REJECT: _simple_decoder(REJECT),
    ReplyCode.TEMPFAIL: _simple_decoder(TEMPFAIL),
    ReplyCode.DISCARD: _simple_decoder(DISCARD),
    ReplyCode.SKIP: _simple_decoder(SKIP),
    ReplyCode.PROGRESS: _simple_decoder(PROGRESS),
    ReplyCode.SHUTDOWN: _simple_decoder(SHUTDOWN),
    ReplyCode.REPLYCODE: _decode_replycode,
    ReplyCode.QUARANTINE: _decode_quarantine,
    ReplyCode.ADDHEADER: _decode_addheader,
    ReplyCode.INSHEADER: _decode_insheader,
    ReplyCode.CHGHEADER: _decode_chgheader,
    ReplyCode.ADDRCPT: _decode_addrcpt,
    ReplyCode.ADDRCPT_PAR: _decode_addrcpt_par,
    ReplyCode.DELRCPT: _decode_delrcpt,
    ReplyCode.CHGFROM: _decode_chgfrom,
    ReplyCode.REPLBODY: _decode_replbody,
}


def decode_reply(code: int, payload: bytes) -> Reply:
    """Decode one reply frame; raise `RemoteProtocolError` on anything malformed."""
    decoder = REPLY_DECODERS.get(code)
    if decoder is None:
        raise RemoteProtocolError(f"{reply_name(code)} is not a reply a milter may send")
    return decoder(payload)
