"""Byte transport under the dispatcher: the MTA socket, or any Trio stream.

The per-command path does one read and one write per round trip. On a real
socket we call ``recv``/``send`` directly and only park in Trio when the
socket is not ready: Trio's stream methods add a scheduler round trip and a
cancel-scope check to every call, which cost more than the command itself.

``io_count`` and ``waiting`` let a watchdog implement the I/O timeout without
a cancel scope per operation (another measured cost).
"""

from __future__ import annotations

import errno
import os
import socket as stdsocket

import trio

RECEIVE_SIZE = 256 * 1024
_YIELD_EVERY = 16  # reads served without waiting before we let other tasks run
_SKIP_AFTER_MISS = 8  # after a read found nothing, wait before this many reads
_QUICKACK = getattr(stdsocket, "TCP_QUICKACK", None)


class Transport:
    """Reads and writes one MTA connection (a generic Trio stream)."""

    __slots__ = ("io_count", "stream", "waiting")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.io_count = 0
        self.waiting = False

    async def receive(self) -> bytes | bytearray:
        """The next bytes from the MTA; empty at end of file."""
        self.waiting = True
        try:
            data = await self.stream.receive_some(RECEIVE_SIZE)
        finally:
            self.waiting = False
        self.io_count += 1
        return data

    async def send(self, data: bytes) -> None:
        self.waiting = True
        try:
            await self.stream.send_all(data)
        finally:
            self.waiting = False
        self.io_count += 1


class SocketTransport(Transport):
    """A TCP or UNIX socket, read and written with direct non-blocking syscalls.

    Also acknowledges at once (``TCP_QUICKACK``) when it waits for more data
    without having answered what it read: an MTA that sends a batch of
    commands which get no reply (``NOREPLY_*`` stages, Sendmail's separate
    macro packets) would otherwise stall ~40 ms on our delayed ACK
    (reference/latency-through-mtas.md).
    """

    __slots__ = ("_fd", "_quickack", "_replied", "_skip", "_spins")

    def __init__(self, stream: trio.SocketStream) -> None:
        super().__init__(stream)
        sock = stream.socket
        self._fd = sock.fileno()
        self._quickack = _QUICKACK is not None and sock.family in (
            stdsocket.AF_INET,
            stdsocket.AF_INET6,
        )
        self._replied = True
        self._spins = 0
        self._skip = 0

    async def receive(self) -> bytes | bytearray:
        fd = self._fd
        if self._skip:
            # The MTA was slower than us lately: a read now would most likely
            # fail (a syscall and an exception for nothing), so wait first.
            self._skip -= 1
            await self._wait(fd)
        while True:
            try:
                data = os.read(fd, RECEIVE_SIZE)
            except BlockingIOError:
                self._skip = _SKIP_AFTER_MISS
                await self._wait(fd)
                continue
            except OSError as exc:
                raise _broken(exc) from exc
            break
        self.io_count += 1
        self._replied = False
        self._spins += 1
        if self._spins >= _YIELD_EVERY:
            # The MTA keeps us busy without our ever waiting: be fair to others.
            self._spins = 0
            await trio.lowlevel.checkpoint()
        return data

    async def _wait(self, fd: int) -> None:
        if not self._replied and self._quickack:
            self._ack_at_once()
        self.waiting = True
        try:
            await trio.lowlevel.wait_readable(fd)
        finally:
            self.waiting = False
        self._spins = 0

    async def send(self, data: bytes) -> None:
        fd = self._fd
        view = memoryview(data)
        while view:
            try:
                sent = os.write(fd, view)
            except BlockingIOError:
                self.waiting = True
                try:
                    await trio.lowlevel.wait_writable(fd)
                finally:
                    self.waiting = False
                continue
            except OSError as exc:
                raise _broken(exc) from exc
            view = view[sent:]
        self.io_count += 1
        self._replied = True

    def _ack_at_once(self) -> None:
        try:
            self.stream.setsockopt(stdsocket.IPPROTO_TCP, _QUICKACK, 1)  # type: ignore[attr-defined]
        except OSError:
            self._quickack = False


def _broken(exc: OSError) -> trio.BrokenResourceError:
    reason = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return trio.BrokenResourceError(f"socket error {reason}: {exc.strerror}")


def transport_for(stream: trio.abc.Stream) -> Transport:
    if isinstance(stream, trio.SocketStream):
        return SocketTransport(stream)
    return Transport(stream)
