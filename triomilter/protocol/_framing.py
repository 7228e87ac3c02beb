"""Incremental packet framing (protocol.md §1), the same for both directions."""

from __future__ import annotations

import struct

from ._constants import MAX_DATA_SIZE
from ._errors import RemoteProtocolError

_unpack_len = struct.Struct(">I").unpack_from


class NeedData:
    """What ``next_event`` returns when a whole packet has not arrived yet."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()
"""The only `NeedData` instance: compare with ``is``."""


class FrameReader:
    """Cuts a byte stream into ``(code, data)`` frames.

    Accepts data in any split. The length of a frame is checked against
    ``max_data_size`` as soon as its 4-byte header is in, before any of its
    data is waited for, so a hostile length never makes us buffer it.

    A read usually holds whole frames (the MTA writes a command and waits):
    then the received ``bytes`` object is sliced directly, without copying it
    into a buffer first. Only a frame split across reads is assembled in a
    ``bytearray``.
    """

    __slots__ = ("_buf", "_dropped", "_pos", "max_data_size")

    def __init__(self, max_data_size: int = MAX_DATA_SIZE) -> None:
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self._dropped = 0  # stream bytes before _buf (for partial_frame)
        self.max_data_size = max_data_size

    def feed(self, data: bytes | bytearray) -> None:
        """Append received bytes."""
        buf = self._buf
        pos = self._pos
        if pos >= len(buf):
            self._dropped += len(buf)
            self._buf = data
        elif isinstance(buf, bytearray):
            if pos:
                del buf[:pos]
                self._dropped += pos
            buf += data
        else:
            # A partial frame is left: from now on assemble in a bytearray
            # (amortised appends, however small the reads).
            self._dropped += pos
            self._buf = bytearray(buf[pos:]) + data
        self._pos = 0

    @property
    def partial_frame(self) -> int | None:
        """Where in the stream the frame still being received began, or None.

        The same number for as long as the same frame is incomplete, so a
        caller with a clock can give a frame a deadline from its first byte
        (a peer trickling one byte at a time never completes one).
        """
        if self._pos >= len(self._buf):
            return None
        return self._dropped + self._pos

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
        end = pos + 4 + length
        code = buf[pos + 4]
        data = buf[pos + 5 : end]
        if end == len(buf):
            self._dropped += end
            self._buf = b""
            end = 0
        self._pos = end
        if type(data) is not bytes:
            data = bytes(data)
        return code, data
