"""Bytes to and from the MTA under the dispatcher: the transport, its I/O deadline, its writes.

The per-command path does one read and one write per round trip. On a real
socket we call ``recv``/``send`` directly and only park in Trio when the
socket is not ready: Trio's stream methods add a scheduler round trip and a
cancel-scope check to every call, which cost more than the command itself.

For the same reason the I/O deadline is not a cancel scope per operation
(measured: about 7 us to arm and disarm one, half a round trip): the
transport counts its operations and says whether it is waiting, and an
`IoDeadline` checked from outside (every twentieth of the timeout) notices a
connection stuck on one operation, or on one packet, for too long.
"""

from __future__ import annotations

import errno
import os
import socket as stdsocket

import trio

from .protocol import MilterConnection

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
        """Completed reads and writes (the I/O deadline watches it move)."""
        self.waiting = False
        """Whether a read or write is waiting for the MTA now."""

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

    async def wait_hangup(self) -> str:
        """Return once the MTA has closed its side; why. A generic stream cannot tell."""
        await trio.sleep_forever()
        raise AssertionError("unreachable")  # pragma: no cover


class SocketTransport(Transport):
    """A TCP or UNIX socket, read and written with direct non-blocking syscalls.

    Also acknowledges at once (``TCP_QUICKACK``) when it waits for more data
    without having answered what it read: an MTA that sends a batch of
    commands which get no reply (``NOREPLY_*`` stages, Sendmail's separate
    macro packets) would otherwise stall ~40 ms on our delayed ACK
    (reference/latency-through-mtas.md).
    """

    __slots__ = ("_fd", "_quickack", "_replied", "_skip", "_spins", "_torn")

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
        self._torn = False

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
        if self._torn:
            raise trio.BrokenResourceError("an earlier write stopped in the middle of a packet")
        fd = self._fd
        try:
            sent = os.write(fd, data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise _broken(exc) from exc
        if sent == len(data):  # the common case: a reply fits the socket buffer at once
            self.io_count += 1
            self._replied = True
            return
        view = memoryview(data)[sent:]
        while view:
            try:
                sent = os.write(fd, view)
            except BlockingIOError:
                self.waiting = True
                try:
                    await trio.lowlevel.wait_writable(fd)
                except BaseException:
                    # Cancelled with part of a packet on the wire: the stream
                    # can never be in step again.
                    self._torn = len(view) != len(data)
                    raise
                finally:
                    self.waiting = False
                continue
            except OSError as exc:
                raise _broken(exc) from exc
            view = view[sent:]
        self.io_count += 1
        self._replied = True

    async def wait_hangup(self) -> str:
        """Return once the MTA has closed its side (EOF or reset); why.

        Only used while a handler runs, when nothing else reads the socket,
        and the MTA owes us nothing until we answer. Peeking leaves any data
        for the next read; if data came, the MTA is still there (we stop
        watching, since a readable socket would wake us forever).
        """
        sock = self.stream.socket  # type: ignore[attr-defined]
        try:
            peeked = await sock.recv(1, stdsocket.MSG_PEEK)
        except OSError as exc:
            return f"the connection broke ({errno.errorcode.get(exc.errno or 0, exc.errno)})"
        if peeked:
            await trio.sleep_forever()
        return "the MTA closed the connection"

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


async def close_stream(stream: trio.abc.Stream) -> None:
    """Close an MTA connection's stream, even while cancelled, within a second.

    A socket is closed at once: that is all `trio.SocketStream.aclose` does
    before its checkpoint, and it cannot block, so the two cancel scopes and
    the checkpoint are saved (measured: about 4 % of the CPU of a connection
    that carries one message, benchmark W3).
    """
    if type(stream) is trio.SocketStream:
        stream.socket.close()
        return
    with trio.CancelScope(shield=True), trio.move_on_after(1):
        await stream.aclose()


class IoDeadline:
    """The I/O deadline of one connection, checked from outside.

    Two rules, both with ``timeout`` seconds: no read or write may wait that
    long, and a packet must be complete that long after its first byte (a
    peer trickling one byte at a time keeps the first rule happy forever).
    `check` runs every ``timeout / 20`` seconds, so the deadline fires at
    most 10 % late; it measures with the clock, not by counting calls.
    """

    __slots__ = ("_count", "_frame", "_frame_since", "_since", "reason", "scope", "timeout")

    CHECKS_PER_TIMEOUT = 20

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.scope: trio.CancelScope | None = None
        """Cancelled when the deadline passes: the scope the session runs in now."""
        self.reason: str | None = None
        self._count = -1
        self._since = 0.0
        self._frame: int | None = None
        self._frame_since = 0.0

    @property
    def period(self) -> float:
        """How often `check` should run."""
        return self.timeout / self.CHECKS_PER_TIMEOUT

    def check(self, transport: Transport, conn: MilterConnection, now: float) -> bool:
        """Cancel `scope` if a deadline passed; True if it did."""
        if not transport.waiting:
            self._count = -1
            self._frame = None
            return False
        frame = conn.partial_frame
        if frame is None:
            self._frame = None
        elif frame != self._frame:
            self._frame = frame
            self._frame_since = now
        elif now - self._frame_since >= self.timeout:
            return self._fire(
                f"a packet was not complete {self.timeout:g} s after its first byte "
                f"({conn.buffered} bytes of it received)"
            )
        count = transport.io_count
        if count != self._count:
            self._count = count
            self._since = now
        elif now - self._since >= self.timeout:
            return self._fire(f"no I/O with the MTA for {self.timeout:g} s")
        return False

    def _fire(self, reason: str) -> bool:
        self.reason = reason
        if self.scope is not None:
            self.scope.cancel()
        return True


class WriteQueue:
    """Everything owed to the MTA, written in the order it was queued.

    End-of-message changes pile up here and go out with the final reply in
    one write. A handler and its background tasks may write at the same time
    (a large queue, progress): one write at a time, in queue order.
    """

    __slots__ = ("outbox", "transport", "writing")

    FLUSH_THRESHOLD = 256 * 1024
    """Queued changes are written early past this many bytes."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.outbox = bytearray()
        self.writing: trio.Event | None = None
        """Set while a write is under way (the next waits for it)."""

    def add(self, data: bytes) -> bool:
        """Queue ``data``; True if the queue should be written now (it is large)."""
        self.outbox += data
        return len(self.outbox) > self.FLUSH_THRESHOLD

    def drop(self) -> None:
        """Forget what is queued (the message failed: its changes are moot)."""
        self.outbox.clear()

    async def send(self, data: bytes) -> None:
        """Write the queue and then ``data`` (a final reply)."""
        if self.writing is None and not self.outbox:
            await self.transport.send(data)  # the common case: nothing else to order
            return
        self.outbox += data
        await self.flush()

    async def flush(self) -> None:
        """Write what is queued, after any write already under way."""
        while self.writing is not None:
            await self.writing.wait()
        if not self.outbox:
            return  # a write that waited with us took it
        data = bytes(self.outbox)
        self.outbox.clear()
        self.writing = done = trio.Event()
        try:
            await self.transport.send(data)
        finally:
            self.writing = None
            done.set()
