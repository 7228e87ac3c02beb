"""A raw, stdlib-only milter for experiments against the real MTAs.

It speaks just enough of protocol v6 to stand in front of Postfix or
Sendmail and records every packet the MTA sends, byte for byte and stage by
stage (the macro packets included), so a test can see exactly what the MTA
sent rather than what a framework made of it.  The negotiation reply (actions,
protocol flags, macro lists per stage, including empty ones) is whatever the
test asks for, and a hook can answer any command with arbitrary packets
(progress packets, delays).  It is deliberately not triomilter: it is the
independent witness for what the MTA does.

One thread per connection; every socket has a timeout; stop() joins all.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType

__all__ = ["Packet", "RawMilter", "continue_reply", "packet"]

# Commands that get no reply (macros, abort, quit, quit-new-connection).
_NO_REPLY = {b"D", b"A", b"Q", b"K"}
# SMFIM_* stage numbers, for ``macros`` keys.
STAGE = {"connect": 0, "helo": 1, "mail": 2, "rcpt": 3, "data": 4, "eom": 5, "eoh": 6}


def packet(code: bytes, payload: bytes = b"") -> bytes:
    """One framed milter packet."""
    return struct.pack("!I", len(payload) + 1) + code + payload


def continue_reply() -> bytes:
    return packet(b"c")


@dataclass(frozen=True)
class Packet:
    """One packet from the MTA, with the time it was read (monotonic)."""

    connection: int
    code: bytes
    payload: bytes
    at: float

    @property
    def macros(self) -> tuple[str, dict[str, str]]:
        """For a ``D`` packet: (the command letter it is for, name -> value)."""
        assert self.code == b"D"
        stage = self.payload[:1].decode()
        parts = self.payload[1:].split(b"\0")
        if parts and parts[-1] == b"":
            parts.pop()
        names = [p.decode("utf-8", "replace") for p in parts[0::2]]
        values = [p.decode("utf-8", "replace") for p in parts[1::2]]
        return stage, dict(zip(names, values, strict=False))


Hook = Callable[[socket.socket, Packet], bytes | None]


@dataclass
class RawMilter:
    """Serve on 127.0.0.1 (``port`` 0: a free one) or on a UNIX socket path.

    ``macros`` maps a stage name (``STAGE`` keys) to the space-separated list
    requested in the negotiation reply ("" requests an empty list).  ``hook``
    may answer a command itself: it gets the socket (to write progress
    packets, sleep...) and returns the final reply bytes, or None for the
    default (CONTINUE).
    """

    actions: int = 0x1FF
    protocol: int = 0
    macros: Mapping[str, str] = field(default_factory=dict)
    hook: Hook | None = None
    port: int = 0
    unix_path: str | None = None
    quickack: bool = False
    packets: list[Packet] = field(default_factory=list)
    offered: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Condition()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._count = 0

    # -- lifecycle

    def start(self) -> RawMilter:
        if self.unix_path is not None:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.unix_path)
            listener.bind(self.unix_path)
        else:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            self.port = listener.getsockname()[1]
        listener.listen(64)
        listener.settimeout(0.2)
        self._listener = listener
        thread = threading.Thread(target=self._accept_loop, name="raw-milter", daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stopping.set()
        for thread in list(self._threads):
            thread.join(5.0)
        with self._lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.close()
        if self._listener is not None:
            self._listener.close()

    def __enter__(self) -> RawMilter:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- inspection

    def snapshot(self) -> list[Packet]:
        with self._lock:
            return list(self.packets)

    def wait_for(self, code: bytes, count: int = 1, timeout: float = 10.0) -> list[Packet]:
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                found = [p for p in self.packets if p.code == code]
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"raw milter: {count} x {code!r} expected within {timeout}s, "
                        f"got {[p.code for p in self.packets]!r}"
                    )
                self._lock.wait(remaining)

    def macros_before(self, command: bytes) -> list[dict[str, str]]:
        """The macros sent (in ``D`` packets) for each ``command`` packet."""
        found = []
        for p in self.snapshot():
            if p.code == b"D":
                stage, values = p.macros
                if stage.encode() == command:
                    found.append(values)
        return found

    def commands(self) -> list[bytes]:
        return [p.code for p in self.snapshot() if p.code != b"D"]

    # -- serving

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._count += 1
                number = self._count
                self._conns.append(conn)
            thread = threading.Thread(
                target=self._serve, args=(conn, number), name=f"raw-milter-{number}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _read_exact(self, conn: socket.socket, size: int) -> bytes | None:
        data = b""
        while len(data) < size:
            try:
                chunk = conn.recv(size - len(data))
            except TimeoutError:
                if self._stopping.is_set():
                    return None
                continue
            except OSError:
                return None
            if not chunk:
                return None
            if self.quickack and conn.family != socket.AF_UNIX:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            data += chunk
        return data

    def _serve(self, conn: socket.socket, number: int) -> None:
        conn.settimeout(0.5)
        if conn.family != socket.AF_UNIX:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while not self._stopping.is_set():
                head = self._read_exact(conn, 4)
                if head is None:
                    return
                (size,) = struct.unpack("!I", head)
                body = self._read_exact(conn, size)
                if body is None or not body:
                    return
                pkt = Packet(number, body[:1], body[1:], time.monotonic())
                with self._lock:
                    self.packets.append(pkt)
                    self._lock.notify_all()
                if pkt.code == b"O":
                    conn.sendall(self._negotiate(pkt.payload))
                    continue
                if pkt.code in _NO_REPLY:
                    if pkt.code == b"Q":
                        return
                    continue
                reply = self.hook(conn, pkt) if self.hook is not None else None
                conn.sendall(continue_reply() if reply is None else reply)
        except OSError:
            return
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def _negotiate(self, payload: bytes) -> bytes:
        version, actions, protocol = struct.unpack("!III", payload[:12])
        self.offered = (version, actions, protocol)
        reply = struct.pack("!III", 6, self.actions & actions, self.protocol & protocol)
        for name, names in self.macros.items():
            reply += struct.pack("!I", STAGE[name]) + names.encode() + b"\0"
        return packet(b"O", reply)
