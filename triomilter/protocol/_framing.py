"""Incremental packet framing (protocol.md §1), the same for both directions."""

from __future__ import annotations

import struct

from ._constants import MAX_DATA_SIZE
from ._errors import RemoteProtocolError

_unpack_len = struct.Struct(">I").unpack_from


class FrameReader:
    """Cuts a byte stream into ``(code, data)`` frames.

    Accepts data in any split. The length of a frame is checked against
    ``max_data_size`` as soon as its 4-byte header is in, before any of its
    data is waited for, so a hostile length never makes us buffer it.
    """

    __slots__ = ("_buf", "_pos", "max_data_size")

    def __init__(self, max_data_size: int = MAX_DATA_SIZE) -> None:
        self._buf = bytearray()
        self._pos = 0
        self.max_data_size = max_data_size

    def feed(self, data: bytes | bytearray) -> None:
        """Append received bytes."""
        buf = self._buf
        if self._pos:
            # Drop what was consumed before growing, so the buffer never holds
            # more than one partial frame plus the new data.
            del buf[: self._pos]
            self._pos = 0
        buf += data

    @property
    def buffered(self) -> int:
        """How many received bytes are not yet part of a returned frame."""
        return len(self._buf) - self._pos

    def next_frame(self) -> tuple[int, bytes] | None:
        """The next complete frame, or None if more data is needed."""
        buf = self._buf
        pos = self._pos
        available = len(buf) - pos
        if available < 4:
            return None
        length = _unpack_len(buf, pos)[0]
        if length == 0:
            raise RemoteProtocolError("packet with length 0 (no command code)")
        if length - 1 > self.max_data_size:
            raise RemoteProtocolError(
                f"packet of {length - 1} data bytes exceeds the limit of {self.max_data_size}"
            )
        if available < length + 4:
            return None
        code = buf[pos + 4]
        data = bytes(buf[pos + 5 : pos + 4 + length])
        pos += 4 + length
        if pos == len(buf):
            buf.clear()
            pos = 0
        self._pos = pos
        return code, data
