"""Commands (MTA -> milter): one immutable class per command (protocol.md §2.1, §5).

Every class encodes itself (MTA role) with ``encode()``; ``decode_command``
turns a frame back into an object (milter role). Strings are ``bytes``: the
engine never guesses an encoding, the handler layer decides.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import attrs

from ._constants import Actions, AddressFamily, CommandCode, ProtocolOpts, command_name
from ._errors import RemoteProtocolError
from ._wire import (
    check_string,
    exact_strings,
    no_payload,
    pack_u16,
    pack_u32,
    packet,
    split_strings,
    unpack_u32_from,
)


@attrs.frozen
class OptionNegotiation:
    """``O``: the MTA's offer: protocol version, actions and protocol steps."""

    code: ClassVar[int] = CommandCode.OPTNEG
    version: int
    actions: Actions
    opts: ProtocolOpts

    def encode(self) -> bytes:
        """This command as one packet (length, code, payload), ready to send to a milter."""
        return packet(
            self.code, pack_u32(self.version) + pack_u32(self.actions) + pack_u32(self.opts)
        )


@attrs.frozen
class DefineMacros:
    """``D``: macros for the command ``stage`` (a command code) that follows."""

    code: ClassVar[int] = CommandCode.MACRO
    stage: int
    macros: tuple[tuple[bytes, bytes], ...] = ()

    def encode(self) -> bytes:
        """This command as one packet (length, code, payload), ready to send to a milter.

        Raises `ValueError` if a string to be sent NUL-terminated contains a NUL byte.
        """
        data = bytearray((self.stage,))
        for name, value in self.macros:
            data += check_string(name, "macro name") + b"\0"
            data += check_string(value, "macro value") + b"\0"
        return packet(self.code, bytes(data))


@attrs.frozen
class Connect:
    """``C``: the SMTP client's host name and address.

    ``port`` is 0 and ``address`` the socket path for UNIX clients; both are
    empty for an unknown family.
    """

    code: ClassVar[int] = CommandCode.CONNECT
    hostname: bytes
    family: AddressFamily
    port: int = 0
    address: bytes = b""

    def encode(self) -> bytes:
        """This command as one packet (length, code, payload), ready to send to a milter.

        Raises `ValueError` if a string to be sent NUL-terminated contains a NUL byte.
        """
        data = check_string(self.hostname, "hostname") + b"\0" + bytes((self.family,))
        if self.family != AddressFamily.UNKNOWN:
            data += pack_u16(self.port) + check_string(self.address, "address") + b"\0"
        return packet(self.code, data)


@attrs.frozen
class Helo:
    """``H``: the HELO/EHLO argument."""

    code: ClassVar[int] = CommandCode.HELO
    hostname: bytes

    def encode(self) -> bytes:
        """This command as one packet (length, code, payload), ready to send to a milter.

        Raises `ValueError` if a string to be sent NUL-terminated contains a NUL byte.
        """
        return packet(self.code, check_string(self.hostname, "helo name") + b"\0")


def _encode_args(code: int, args: tuple[bytes, ...]) -> bytes:
    return packet(code, b"".join(check_string(arg, "argument") + b"\0" for arg in args))


@attrs.frozen
class Mail:
    """``M``: ``args[0]`` is the sender as given (``<a@b>``), the rest ESMTP parameters."""

    code: ClassVar[int] = CommandCode.MAIL
    args: tuple[bytes, ...]

    def encode(self) -> bytes:
        """This command as one packet (length, code, payload), ready to send to a milter.

        Raises `ValueError` if a string to be sent NUL-terminated contains a NUL byte.
        """
        return _encode_args(self.code, self.args)


@attrs.frozen
class Rcpt:
    """``R``: ``args[0]`` is the recipient as given, the rest ESMTP parameters."""

    code: ClassVar[int] = CommandCode.RCPT
    args: tuple[bytes, ...]

    def encode(self) -> bytes:
        """This command as one packet (length, code, payload), ready to send to a milter.

        Raises `ValueError` if a string to be sent NUL-terminated contains a NUL byte.
        """
        return _encode_args(self.code, self.args)


@attrs.frozen
class Data:
    """``T``: the DATA command (before the headers)."""

    code: ClassVar[int] = CommandCode.DATA

    def encode(self) -> bytes:
        """This command as one packet (length, code), ready to send to a milter."""
        return _DATA_WIRE


@attrs.frozen
class Header:
    """``L``: one header field; folded lines are separated by bare LF."""

    code: ClassVar[int] = CommandCode.HEADER
    name: bytes
    value: bytes

    def encode(self) -> bytes:
        """This command as one packet (length, code, payload), ready to send to a milter.

        Raises `ValueError` if a string to be sent NUL-terminated contains a NUL byte.
        """
        return packet(
            self.code,
            check_string(self.name, "header name")
            + b"\0"
            + check_string(self.value, "header value")
            + b"\0",
        )


@attrs.frozen
class EndOfHeaders:
    """``N``: end of the header section."""

    code: ClassVar[int] = CommandCode.EOH

    def encode(self) -> bytes:
        """This command as one packet (length, code), ready to send to a milter."""
        return _EOH_WIRE


@attrs.frozen
class Body:
    """``B``: one chunk of the body (CRLF line endings, at most 65535 bytes from MTAs)."""

    code: ClassVar[int] = CommandCode.BODY
    chunk: bytes

    def encode(self) -> bytes:
        """This command as one packet (length, code, payload), ready to send to a milter."""
        return packet(self.code, self.chunk)


@attrs.frozen
class EndOfMessage:
    """``E``: end of message. libmilter accepts a last body chunk here; MTAs send none."""

    code: ClassVar[int] = CommandCode.EOM
    chunk: bytes = b""

    def encode(self) -> bytes:
        """This command as one packet (length, code, payload), ready to send to a milter."""
        return packet(self.code, self.chunk)


@attrs.frozen
class Abort:
    """``A``: the current message is abandoned (never answered)."""

    code: ClassVar[int] = CommandCode.ABORT

    def encode(self) -> bytes:
        """This command as one packet (length, code), ready to send to a milter."""
        return _ABORT_WIRE


@attrs.frozen
class Quit:
    """``Q``: the session is over; the milter closes the connection."""

    code: ClassVar[int] = CommandCode.QUIT

    def encode(self) -> bytes:
        """This command as one packet (length, code), ready to send to a milter."""
        return _QUIT_WIRE


@attrs.frozen
class QuitNewConnection:
    """``K``: the session is over, a new one (a new ``C``) follows on this socket."""

    code: ClassVar[int] = CommandCode.QUIT_NC

    def encode(self) -> bytes:
        """This command as one packet (length, code), ready to send to a milter."""
        return _QUIT_NC_WIRE


@attrs.frozen
class Unknown:
    """``U``: an SMTP command the MTA does not know, as the client sent it."""

    code: ClassVar[int] = CommandCode.UNKNOWN
    command: bytes

    def encode(self) -> bytes:
        """This command as one packet (length, code, payload), ready to send to a milter.

        Raises `ValueError` if a string to be sent NUL-terminated contains a NUL byte.
        """
        return packet(self.code, check_string(self.command, "command") + b"\0")


_DATA_WIRE = packet(CommandCode.DATA)
_EOH_WIRE = packet(CommandCode.EOH)
_ABORT_WIRE = packet(CommandCode.ABORT)
_QUIT_WIRE = packet(CommandCode.QUIT)
_QUIT_NC_WIRE = packet(CommandCode.QUIT_NC)

DATA = Data()
"""The `Data` command (it has no fields: one instance serves)."""
END_OF_HEADERS = EndOfHeaders()
"""The `EndOfHeaders` command."""
ABORT = Abort()
"""The `Abort` command."""
QUIT = Quit()
"""The `Quit` command."""
QUIT_NEW_CONNECTION = QuitNewConnection()
"""The `QuitNewConnection` command."""

Command = (
    OptionNegotiation
    | DefineMacros
    | Connect
    | Helo
    | Mail
    | Rcpt
    | Data
    | Header
    | EndOfHeaders
    | Body
    | EndOfMessage
    | Abort
    | Quit
    | QuitNewConnection
    | Unknown
)
"""Any command an MTA sends: what `MilterConnection.next_event` returns and
`MtaConnection.send` takes."""


# --- decoding (milter role) -------------------------------------------------


def _decode_optneg(payload: bytes) -> OptionNegotiation:
    # libmilter reads the first 12 bytes and ignores any rest (future MTAs).
    if len(payload) < 12:
        raise RemoteProtocolError(f"OPTNEG ('O'): expected at least 12 bytes, got {len(payload)}")
    return OptionNegotiation(
        unpack_u32_from(payload, 0)[0],
        Actions(unpack_u32_from(payload, 4)[0]),
        ProtocolOpts(unpack_u32_from(payload, 8)[0]),
    )


def _decode_macro(payload: bytes) -> DefineMacros:
    if not payload:
        raise RemoteProtocolError("MACRO ('D'): missing the command code byte")
    rest = payload[1:]
    parts = split_strings(rest, "MACRO ('D')") if rest else []
    if len(parts) % 2:
        raise RemoteProtocolError("MACRO ('D'): a macro name has no value")
    pairs = tuple(zip(parts[::2], parts[1::2], strict=True))
    return DefineMacros(payload[0], pairs)


def _decode_connect(payload: bytes) -> Connect:
    end = payload.find(b"\0")
    if end < 0 or end + 1 >= len(payload):
        raise RemoteProtocolError("CONNECT ('C'): expected hostname\\0 and a family byte")
    hostname = payload[:end]
    family_byte = payload[end + 1]
    try:
        family = AddressFamily(family_byte)
    except ValueError:
        raise RemoteProtocolError(
            f"CONNECT ('C'): unknown address family {bytes((family_byte,))!r}"
        ) from None
    if family == AddressFamily.UNKNOWN:
        # libmilter ignores anything after an unknown family.
        return Connect(hostname, family)
    rest = payload[end + 2 :]
    if len(rest) < 3 or rest[-1] != 0:
        raise RemoteProtocolError("CONNECT ('C'): expected a port and a NUL-terminated address")
    address = rest[2:-1]
    if b"\0" in address:
        raise RemoteProtocolError("CONNECT ('C'): data after the address")
    return Connect(hostname, family, (rest[0] << 8) | rest[1], address)


def _decode_helo(payload: bytes) -> Helo:
    # Sendmail can send more than one string (obsolete); keep the first like libmilter.
    return Helo(split_strings(payload, "HELO ('H')")[0])


def _decode_mail(payload: bytes) -> Mail:
    return Mail(tuple(split_strings(payload, "MAIL ('M')")))


def _decode_rcpt(payload: bytes) -> Rcpt:
    return Rcpt(tuple(split_strings(payload, "RCPT ('R')")))


def _decode_data(payload: bytes) -> Data:
    no_payload(payload, "DATA ('T')")
    return DATA


def _decode_header(payload: bytes) -> Header:
    # Inline fast path: Postfix sends one per header line of every message.
    if payload[-1:] == b"\0":
        parts = payload[:-1].split(b"\0")
        if len(parts) == 2:
            return Header(parts[0], parts[1])
    name, value = exact_strings(payload, 2, "HEADER ('L')")  # raises with the reason
    return Header(name, value)


def _decode_eoh(payload: bytes) -> EndOfHeaders:
    no_payload(payload, "EOH ('N')")
    return END_OF_HEADERS


def _decode_body(payload: bytes) -> Body:
    return Body(payload)


def _decode_eom(payload: bytes) -> EndOfMessage:
    return EndOfMessage(payload) if payload else _EOM


def _decode_abort(payload: bytes) -> Abort:
    no_payload(payload, "ABORT ('A')")
    return ABORT


def _decode_quit(payload: bytes) -> Quit:
    no_payload(payload, "QUIT ('Q')")
    return QUIT


def _decode_quit_nc(payload: bytes) -> QuitNewConnection:
    no_payload(payload, "QUIT_NC ('K')")
    return QUIT_NEW_CONNECTION


def _decode_unknown(payload: bytes) -> Unknown:
    return Unknown(split_strings(payload, "UNKNOWN ('U')")[0])


_EOM = EndOfMessage()

COMMAND_DECODERS: dict[int, Callable[[bytes], Command]] = {
    CommandCode.OPTNEG: _decode_optneg,
    CommandCode.MACRO: _decode_macro,
    CommandCode.CONNECT: _decode_connect,
    CommandCode.HELO: _decode_helo,
    CommandCode.MAIL: _decode_mail,
    CommandCode.RCPT: _decode_rcpt,
    CommandCode.DATA: _decode_data,
    CommandCode.HEADER: _decode_header,
    CommandCode.EOH: _decode_eoh,
    CommandCode.BODY: _decode_body,
    CommandCode.EOM: _decode_eom,
    CommandCode.ABORT: _decode_abort,
    CommandCode.QUIT: _decode_quit,
    CommandCode.QUIT_NC: _decode_quit_nc,
    CommandCode.UNKNOWN: _decode_unknown,
}


def decode_command(code: int, payload: bytes) -> Command:
    """Decode one command frame; raise `RemoteProtocolError` on anything malformed."""
    decoder = COMMAND_DECODERS.get(code)
    if decoder is None:
        raise RemoteProtocolError(f"{command_name(code)} is not a milter command")
    return decoder(payload)
