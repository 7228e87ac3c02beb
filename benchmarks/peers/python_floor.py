"""python_floor: the C no-op responder's logic in plain Python, the floor of any Python milter.

It does what ``noop_responder.c`` does and nothing more: frames packets
(4-byte big-endian length + command byte) without decoding them, answers
from the same fixed table (``O`` -> version 6, ADDHDRS, no NO_* steps; ``E``
-> ``h X-Bench 1`` + ``c``; ``D``/``A``/``K`` -> nothing; ``Q`` -> close;
anything else -> ``c``; with ``--eom-only`` the NO_* steps offered), everything owed for one read in one write. One
thread, one level-triggered epoll, each socket registered once: no
framework, no per-wait re-registration, no validation, no handlers.

What it costs per message is what the interpreter itself costs for the
syscalls and the framing of a milter conversation: a pure-Python milter
cannot use less CPU than this, whatever its framework. Not a milter to
use: it accepts any offer and checks nothing.

With ``--trio`` the same loop runs as one Trio task per connection (a read,
and ``trio.lowlevel.wait_readable`` when it would block): the difference is
what Trio's scheduling costs per round trip, which any Trio milter pays.

usage: python_floor.py [--host 127.0.0.1] (--port PORT | --unix PATH) [--trio] [--eom-only]
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import struct

_CONTINUE = b"\0\0\0\x01c"
_EOM = b"\0\0\0\x0bhX-Bench\x001\x00" + _CONTINUE
_NO_STAGES = 0x37F  # NO_CONNECT..NO_EOH, NO_UNKNOWN, NO_DATA
_EOM_ONLY = False
_SILENT = frozenset(b"DAK")
_unpack = struct.Struct(">I").unpack_from


def _replies(buf: bytearray) -> tuple[bytes, int, bool] | None:
    """The replies owed for the complete packets in ``buf``, bytes used, and 'close'."""
    out = []
    pos = 0
    end = len(buf)
    while end - pos >= 4:
        length = _unpack(buf, pos)[0]
        if length == 0 or end - pos < 4 + length:
            break
        cmd = buf[pos + 4]
        pos += 4 + length
        if cmd in _SILENT:
            continue
        if cmd == 0x45:  # E
            out.append(_EOM)
        elif cmd == 0x4F:  # O
            offered = _unpack(buf, pos - length + 9)[0] if length >= 13 else 0
            steps = (_NO_STAGES & (offered or 0x3F)) if _EOM_ONLY else 0
            out.append(struct.pack(">IcIII", 13, b"O", 6, 0x01, steps))
        elif cmd == 0x51:  # Q
            return b"".join(out), pos, True
        else:
            out.append(_CONTINUE)
    return b"".join(out), pos, False


def serve(listener: socket.socket) -> None:
    listener.setblocking(False)
    ep = select.epoll()
    ep.register(listener.fileno(), select.EPOLLIN)
    conns: dict[int, tuple[socket.socket, bytearray]] = {}
    lfd = listener.fileno()
    tcp = listener.family != socket.AF_UNIX
    while True:
        for fd, _ in ep.poll():
            if fd == lfd:
                try:
                    sock, _ = listener.accept()
                except BlockingIOError:
                    continue
                sock.setblocking(False)
                if tcp:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conns[sock.fileno()] = (sock, bytearray())
                ep.register(sock.fileno(), select.EPOLLIN)
                continue
            sock, buf = conns[fd]
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            close = not data
            if data:
                buf += data
                replies = _replies(buf)
                if replies is not None:
                    out, used, close = replies
                    del buf[:used]
                    if out:
                        # Replies are small and the MTA waits for them: they fit at once.
                        os.write(fd, out)
            if close:
                ep.unregister(fd)
                del conns[fd]
                sock.close()


async def serve_trio(listener: socket.socket) -> None:
    """The same on Trio: a task per connection, a read, ``wait_readable`` when it would block."""
    import trio

    async def connection(sock: socket.socket) -> None:
        fd = sock.fileno()
        buf = bytearray()
        with sock:
            while True:
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(fd)
                    continue
                except OSError:
                    return
                if not data:
                    return
                buf += data
                replies = _replies(buf)
                if replies is None:
                    continue
                out, used, close = replies
                del buf[:used]
                if out:
                    os.write(fd, out)
                if close:
                    return

    listener.setblocking(False)
    tcp = listener.family != socket.AF_UNIX
    async with trio.open_nursery() as nursery:
        while True:
            await trio.lowlevel.wait_readable(listener)
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                continue
            sock.setblocking(False)
            if tcp:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            nursery.start_soon(connection, sock)


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", type=int)
    where.add_argument("--unix", metavar="PATH")
    p.add_argument("--eom-only", action="store_true", help="ask for NO_* for every stage")
    p.add_argument("--trio", action="store_true", help="the same loop as Trio tasks")
    a = p.parse_args()
    global _EOM_ONLY
    _EOM_ONLY = a.eom_only
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    if a.unix:
        if os.path.exists(a.unix):
            os.unlink(a.unix)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(a.unix)
    else:
        family = socket.AF_INET6 if ":" in a.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((a.host, a.port))
    listener.listen(1024)
    try:
        if a.trio:
            import trio

            trio.run(serve_trio, listener)
        else:
            serve(listener)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
