"""Small helpers shared by the command and reply codecs."""

from __future__ import annotations

import struct

from ._errors import RemoteProtocolError

_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
pack_u32 = _U32.pack
unpack_u32_from = _U32.unpack_from
pack_u16 = _U16.pack


def packet(code: int, data: bytes = b"") -> bytes:
    """Frame ``data`` as one packet: length (code + data), code byte, data."""
    return _U32.pack(len(data) + 1) + bytes((code,)) + data


def check_string(value: bytes, what: str) -> bytes:
    """Refuse a NUL inside a string that goes on the wire NUL-terminated."""
    if b"\0" in value:
        raise ValueError(f"{what} must not contain a NUL byte: {value!r}")
    return value


def split_strings(payload: bytes, what: str) -> list[bytes]:
    """Split a payload of NUL-terminated strings; the last one must be terminated."""
    if not payload or payload[-1] != 0:
        raise RemoteProtocolError(f"{what}: payload is not NUL-terminated: {payload[:64]!r}")
    return payload[:-1].split(b"\0")


def exact_strings(payload: bytes, count: int, what: str) -> list[bytes]:
    """Split a payload that must hold exactly ``count`` NUL-terminated strings."""
    parts = split_strings(payload, what)
    if len(parts) != count:
        raise RemoteProtocolError(
            f"{what}: expected {count} NUL-terminated string(s), got {len(parts)}"
        )
    return parts


def no_payload(payload: bytes, what: str) -> None:
    if payload:
        raise RemoteProtocolError(f"{what}: expected no data, got {len(payload)} byte(s)")
