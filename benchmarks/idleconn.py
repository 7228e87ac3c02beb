"""idleconn: open N milter connections, bring each to the idle state, hold them.

The W5 client (MTA side, stdlib only).  For each of N connections it:
negotiates (version 6, actions 0x1ff, protocol 0x1fffff, what Postfix and
Sendmail offer), sends CONNECT and HELO (honouring the NO_*/NR_* flags the
milter negotiated, and waiting for the replies it owes), and then leaves the
connection idle: the state of an SMTP session that has said EHLO and not yet
MAIL FROM.  At most --parallel handshakes are in flight at once.

When every connection is idle (or failed, or --setup-timeout passed) it
prints one JSON line:

    {"requested": N, "established": E, "failed": F, "setup_s": S, "errors": {...}}

and holds the connections until its standard input is closed or --hold
seconds pass, then closes them all and exits.  Bounded in time and count.

usage: idleconn.py [-n N] [--parallel P] [--setup-timeout S] [--hold S] HOST:PORT
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import json
import os
import resource
import selectors
import socket
import struct
import sys
import time

OFFER_ACTIONS = 0x1FF
OFFER_PROTOCOL = 0x1FFFFF
NOCONNECT, NOHELO = 0x1, 0x2
NR_CONN, NR_HELO = 0x1000, 0x2000


def packet(cmd: bytes, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload) + 1) + cmd + payload


OPTNEG = packet(b"O", struct.pack(">III", 6, OFFER_ACTIONS, OFFER_PROTOCOL))


def connect_packet(port: int) -> bytes:
    return packet(b"D", b"C" + b"j\0mta.bench.test\0") + packet(
        b"C", b"client.bench.test\0" + b"4" + struct.pack(">H", port) + b"192.0.2.1\0"
    )


HELO = packet(b"D", b"H") + packet(b"H", b"client.bench.test\0")


class Conn:
    __slots__ = ("n", "pflags", "rbuf", "sock", "step")

    def __init__(self, sock: socket.socket, n: int) -> None:
        self.sock = sock
        self.n = n
        self.step = "connecting"  # -> optneg -> connect -> helo -> idle
        self.rbuf = b""
        self.pflags = 0


def raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("-n", "--connections", type=int, default=10000)
    ap.add_argument("--parallel", type=int, default=200)
    ap.add_argument("--setup-timeout", type=float, default=120.0)
    ap.add_argument("--hold", type=float, default=300.0)
    ap.add_argument("target")
    a = ap.parse_args()
    host, _, port_s = a.target.rpartition(":")
    host = host.strip("[]")
    port = int(port_s)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    raise_nofile()

    sel = selectors.DefaultSelector()
    conns: dict[int, Conn] = {}
    errors: collections.Counter[str] = collections.Counter()
    established = failed = started = 0
    t0 = time.monotonic()
    deadline = t0 + a.setup_timeout
    connect_pkt = connect_packet(40000)

    def fail(c: Conn, why: str) -> None:
        nonlocal failed
        failed += 1
        errors[why] += 1
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(c.sock)
        c.sock.close()
        conns.pop(c.n, None)

    def send(c: Conn, data: bytes) -> bool:
        try:
            c.sock.sendall(data)  # tiny packets into an empty socket buffer
            return True
        except OSError as e:
            fail(c, f"send: {errno.errorcode.get(e.errno or 0, e)}")
            return False

    def advance(c: Conn) -> None:
        """Send the next command; skip steps that the milter opted out of."""
        nonlocal established
        while True:
            if c.step == "optneg":
                c.step = "connect"
                if c.pflags & NOCONNECT:
                    continue
                if not send(c, connect_pkt):
                    return
                if c.pflags & NR_CONN:
                    continue
                return
            if c.step == "connect":
                c.step = "helo"
                if c.pflags & NOHELO:
                    continue
                if not send(c, HELO):
                    return
                if c.pflags & NR_HELO:
                    continue
                return
            if c.step == "helo":
                c.step = "idle"
                established += 1
                # Idle: only watch for the milter closing on us.
                return
            return

    def on_packet(c: Conn, cmd: int, payload: bytes) -> None:
        if cmd == ord("p"):  # progress: keep waiting
            return
        if c.step == "optneg":
            if cmd != ord("O") or len(payload) < 12:
                fail(c, f"optneg reply {chr(cmd)!r}")
                return
            _, _, c.pflags = struct.unpack(">III", payload[:12])
            advance(c)
        elif c.step in ("connect", "helo"):
            if cmd != ord("c"):
                fail(c, f"{c.step} reply {chr(cmd)!r}")
                return
            advance(c)
        else:
            fail(c, f"unexpected {chr(cmd)!r} while idle")

    def on_readable(c: Conn) -> None:
        try:
            data = c.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as e:
            fail(c, f"recv: {errno.errorcode.get(e.errno or 0, e)}")
            return
        if not data:
            fail(c, f"closed by milter during {c.step}")
            return
        c.rbuf += data
        while len(c.rbuf) >= 5:
            (ln,) = struct.unpack(">I", c.rbuf[:4])
            if ln == 0 or ln > 1 << 20:
                fail(c, "bad packet length")
                return
            if len(c.rbuf) < 4 + ln:
                break
            cmd, payload = c.rbuf[4], c.rbuf[5 : 4 + ln]
            c.rbuf = c.rbuf[4 + ln :]
            on_packet(c, cmd, payload)
            if c.n not in conns:
                return

    def start_one() -> None:
        nonlocal started
        n = started
        started += 1
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c = Conn(s, n)
        conns[n] = c
        rc = s.connect_ex((host, port))
        if rc not in (0, errno.EINPROGRESS):
            fail(c, f"connect: {errno.errorcode.get(rc, rc)}")
            return
        sel.register(s, selectors.EVENT_WRITE, c)

    def in_flight() -> int:
        return started - established - failed

    while (established + failed < a.connections) and time.monotonic() < deadline:
        while started < a.connections and in_flight() < a.parallel:
            start_one()
        for key, _ev in sel.select(timeout=0.2):
            c = key.data
            if c.n not in conns:
                continue
            if c.step == "connecting":
                err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    fail(c, f"connect: {errno.errorcode.get(err, err)}")
                    continue
                sel.modify(c.sock, selectors.EVENT_READ, c)
                c.step = "optneg"
                send(c, OPTNEG)
                continue
            on_readable(c)

    setup_s = time.monotonic() - t0
    pending = a.connections - established - failed
    if pending:
        errors["setup timeout"] += pending
    print(
        json.dumps(
            {
                "requested": a.connections,
                "established": established,
                "failed": failed + pending,
                "setup_s": round(setup_s, 3),
                "errors": dict(errors),
            }
        ),
        flush=True,
    )

    # Hold: idle connections stay open until stdin closes or --hold expires.
    established = len(conns)
    hold_end = time.monotonic() + a.hold
    stdin_fd = sys.stdin.fileno()
    try:
        sel.register(stdin_fd, selectors.EVENT_READ, None)
        os.set_blocking(stdin_fd, False)
    except (OSError, ValueError):
        pass  # stdin is a file or /dev/null (not pollable): hold for --hold seconds
    done = False
    while not done and time.monotonic() < hold_end:
        for key, _ in sel.select(timeout=0.5):
            if key.data is None:
                try:
                    if not os.read(stdin_fd, 4096):
                        done = True
                except BlockingIOError:
                    pass
                except OSError:
                    done = True
            else:
                c = key.data
                if c.n in conns:
                    on_readable(c)  # a milter closing an idle connection is counted
    print(json.dumps({"dropped_while_idle": established - len(conns)}), flush=True)
    for c in list(conns.values()):
        c.sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
