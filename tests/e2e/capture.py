"""A tiny SMTP sink that records exactly what Postfix relays to it.

Stdlib only (threads + sockets) so the end-to-end tests need nothing beyond
Postfix itself.  It accepts every command, advertises 8BITMIME, SMTPUTF8 and
PIPELINING (without them Postfix would re-encode 8-bit mail), and keeps the
message bytes exactly as received after dot-unstuffing, CRLFs included, so
tests can compare them byte for byte.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
from types import TracebackType

__all__ = ["CapturedMessage", "CaptureServer", "parse_esmtp_params"]

Params = dict[str, str | None]

_MAX_COMMAND_LINE = 64 * 1024  # far above RFC 5321's 512, still bounded
_MAX_MESSAGE = 256 * 1024 * 1024  # bounded memory per message
_CHUNK = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class CapturedMessage:
    """One message as delivered by the MTA under test.

    ``rcpt_params[i]`` holds the ESMTP parameters of ``rcpt_tos[i]``.  Parameter
    names are upper-cased; a keyword without ``=value`` maps to ``None``.
    """

    mail_from: str
    mail_params: Params
    rcpt_tos: list[str]
    rcpt_params: list[Params]
    data: bytes
    helo: str
    peer: tuple[str, int]

    @property
    def recipients(self) -> list[tuple[str, Params]]:
        """Recipients paired with their ESMTP parameters."""
        return list(zip(self.rcpt_tos, self.rcpt_params, strict=True))

    @property
    def headers(self) -> bytes:
        """The header block (up to, excluding, the first empty line)."""
        head, _, _ = self.data.partition(b"\r\n\r\n")
        return head + b"\r\n"

    @property
    def body(self) -> bytes:
        """Everything after the first empty line."""
        _, sep, body = self.data.partition(b"\r\n\r\n")
        return body if sep else b""


def parse_esmtp_params(text: str) -> Params:
    """Parse ``KEY=VALUE KEY2`` into an ordered dict with upper-cased keys."""
    params: Params = {}
    for word in text.split():
        key, eq, value = word.partition("=")
        params[key.upper()] = value if eq else None
    return params


def _parse_path(arg: str, prefix: str) -> tuple[str, Params] | None:
    """Split ``FROM:<addr> params`` into address and params; None if malformed."""
    if not arg.upper().startswith(prefix):
        return None
    rest = arg[len(prefix) :].lstrip()
    if rest.startswith("<"):
        end = rest.find(">")
        if end < 0:
            return None
        return rest[1:end], parse_esmtp_params(rest[end + 1 :])
    addr, _, params = rest.partition(" ")
    return addr, parse_esmtp_params(params)


class _LineReader:
    """Buffered reader over a socket yielding lines (with their endings)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = b""
        self._eof = False

    def read_line(self, limit: int) -> bytes:
        """Return up to ``limit`` bytes ending at LF; b"" at EOF.

        A returned chunk without a trailing LF is the first part of an
        over-long line (or the final bytes before EOF).
        """
        while True:
            nl = self._buf.find(b"\n", 0, limit)
            if nl >= 0:
                line, self._buf = self._buf[: nl + 1], self._buf[nl + 1 :]
                return line
            if len(self._buf) >= limit or self._eof:
                line, self._buf = self._buf[:limit], self._buf[limit:]
                return line
            chunk = self._sock.recv(_CHUNK)
            if not chunk:
                self._eof = True
            self._buf += chunk


class _ProtocolError(Exception):
    """The client broke the protocol badly enough to drop the session."""


class CaptureServer:
    """Threaded SMTP sink on 127.0.0.1 that records every accepted message.

    One thread per connection (bounded by ``max_connections``); each socket has
    an idle timeout so a stuck client cannot keep a thread forever.
    """

    hostname = "capture.test.invalid"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        idle_timeout: float = 60.0,
        max_connections: int = 200,
    ) -> None:
        if not host.startswith("127.") and host != "::1":
            raise ValueError("the capture server listens on loopback only")
        self._host = host
        self._requested_port = port
        self._idle_timeout = idle_timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        self._lock = threading.Condition()
        self._messages: list[CapturedMessage] = []
        self._errors: list[str] = []
        self._sessions = 0
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._stopping = threading.Event()

    # -- lifecycle -----------------------------------------------------

    def start(self) -> CaptureServer:
        """Bind, listen and start accepting; returns self for chaining."""
        if self._listener is not None:
            return self
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self._host, self._requested_port))
        listener.listen(128)
        listener.settimeout(0.2)  # lets the accept loop notice stop()
        self._listener = listener
        self._stopping.clear()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="capture-accept", daemon=True
        )
        self._accept_thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, drop open sessions and join all threads."""
        self._stopping.set()
        listener, self._listener = self._listener, None
        if self._accept_thread is not None:
            self._accept_thread.join(timeout)
            self._accept_thread = None
        if listener is not None:
            listener.close()
        with self._lock:
            conns = dict(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout
        for thread in conns.values():
            thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> CaptureServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- inspection ----------------------------------------------------

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The bound TCP port (only valid after start())."""
        if self._listener is None:
            raise RuntimeError("capture server is not running")
        port: int = self._listener.getsockname()[1]
        return port

    @property
    def messages(self) -> list[CapturedMessage]:
        """Snapshot of the messages received so far, in arrival order."""
        with self._lock:
            return list(self._messages)

    @property
    def errors(self) -> list[str]:
        """Protocol problems seen (bad commands, overflows); tests may assert empty."""
        with self._lock:
            return list(self._errors)

    @property
    def session_count(self) -> int:
        """Number of SMTP connections accepted since the last clear()."""
        with self._lock:
            return self._sessions

    def clear(self) -> None:
        """Forget messages, errors and the session count (between tests)."""
        with self._lock:
            self._messages.clear()
            self._errors.clear()
            self._sessions = 0

    def wait_for(self, count: int, timeout: float = 10.0) -> list[CapturedMessage]:
        """Wait until at least ``count`` messages arrived; return them all.

        Raises TimeoutError (listing what did arrive) when the deadline passes.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self._messages) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    got = [(m.mail_from, m.rcpt_tos) for m in self._messages]
                    raise TimeoutError(
                        f"capture: expected {count} message(s) within {timeout}s, "
                        f"got {len(got)}: {got!r}; errors: {self._errors!r}"
                    )
                self._lock.wait(remaining)
            return list(self._messages)

    def wait_quiet(self, quiet: float = 0.5, timeout: float = 10.0) -> list[CapturedMessage]:
        """Wait until no new message arrived for ``quiet`` seconds.

        Useful to assert that nothing *extra* shows up after the expected mail.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            seen = len(self._messages)
            last_change = time.monotonic()
            while True:
                now = time.monotonic()
                if now - last_change >= quiet or now >= deadline:
                    return list(self._messages)
                self._lock.wait(min(quiet - (now - last_change), deadline - now))
                if len(self._messages) != seen:
                    seen = len(self._messages)
                    last_change = time.monotonic()

    # -- server internals ---------------------------------------------

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping.is_set():
            try:
                conn, peer = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.05)  # e.g. EMFILE: back off rather than spin
                continue
            if not self._slots.acquire(timeout=self._idle_timeout):
                self._error("too many concurrent connections; dropped one")
                conn.close()
                continue
            thread = threading.Thread(
                target=self._serve, args=(conn, peer), name=f"capture-{peer[1]}", daemon=True
            )
            with self._lock:
                self._conns[conn] = thread
                self._sessions += 1
            thread.start()

    def _error(self, text: str) -> None:
        with self._lock:
            self._errors.append(text)

    def _serve(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        try:
            conn.settimeout(self._idle_timeout)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._session(conn, _LineReader(conn), (peer[0], peer[1]))
        except (OSError, _ProtocolError) as exc:
            if not self._stopping.is_set():
                self._error(f"session from {peer}: {exc!r}")
        finally:
            with self._lock:
                self._conns.pop(conn, None)
            conn.close()
            self._slots.release()

    def _session(self, conn: socket.socket, reader: _LineReader, peer: tuple[str, int]) -> None:
        # Replies are sent one per command, in order; with PIPELINING the client
        # may send several commands at once, which the line reader buffers.
        def reply(text: str) -> None:
            conn.sendall(text.encode("ascii") + b"\r\n")

        reply(f"220 {self.hostname} ESMTP capture")
        helo = ""
        mail_from: str | None = None
        mail_params: Params = {}
        rcpts: list[tuple[str, Params]] = []
        while True:
            raw = reader.read_line(_MAX_COMMAND_LINE)
            if not raw:
                return  # client closed without QUIT: legal enough for a sink
            if not raw.endswith(b"\n"):
                raise _ProtocolError(f"command line too long or truncated: {raw[:80]!r}")
            line = raw.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
            verb, _, arg = line.partition(" ")
            verb = verb.upper()
            if verb == "EHLO":
                helo = arg.strip()
                reply(
                    f"250-{self.hostname} greets {helo}\r\n"
                    f"250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
                    f"250-SIZE {_MAX_MESSAGE}\r\n250 ENHANCEDSTATUSCODES"
                )
            elif verb == "HELO":
                helo = arg.strip()
                reply(f"250 {self.hostname}")
            elif verb == "MAIL":
                parsed = _parse_path(arg, "FROM:")
                if parsed is None:
                    self._error(f"bad MAIL: {line!r}")
                    reply("501 5.5.4 Syntax: MAIL FROM:<address>")
                    continue
                mail_from, mail_params = parsed
                rcpts = []
                reply("250 2.1.0 Ok")
            elif verb == "RCPT":
                parsed = _parse_path(arg, "TO:")
                if parsed is None or mail_from is None:
                    self._error(f"bad RCPT: {line!r}")
                    reply("503 5.5.1 Error: need MAIL" if parsed else "501 5.5.4 Syntax")
                    continue
                rcpts.append(parsed)
                reply("250 2.1.5 Ok")
            elif verb == "DATA":
                if mail_from is None or not rcpts:
                    self._error(f"DATA without envelope: {line!r}")
                    reply("503 5.5.1 Error: need RCPT")
                    continue
                reply("354 End data with <CR><LF>.<CR><LF>")
                data = self._read_data(reader)
                msg = CapturedMessage(
                    mail_from=mail_from,
                    mail_params=mail_params,
                    rcpt_tos=[r[0] for r in rcpts],
                    rcpt_params=[r[1] for r in rcpts],
                    data=data,
                    helo=helo,
                    peer=peer,
                )
                with self._lock:
                    self._messages.append(msg)
                    self._lock.notify_all()
                mail_from, mail_params, rcpts = None, {}, []
                reply("250 2.0.0 Ok: queued")
            elif verb == "RSET":
                mail_from, mail_params, rcpts = None, {}, []
                reply("250 2.0.0 Ok")
            elif verb == "NOOP":
                reply("250 2.0.0 Ok")
            elif verb == "VRFY":
                reply("252 2.0.0 Cannot VRFY")
            elif verb == "QUIT":
                reply("221 2.0.0 Bye")
                return
            else:
                self._error(f"unknown command: {line!r}")
                reply("502 5.5.2 Command not recognized")

    @staticmethod
    def _read_data(reader: _LineReader) -> bytes:
        """Read DATA up to the lone dot, undoing dot-stuffing, keeping CRLFs."""
        parts: list[bytes] = []
        size = 0
        at_line_start = True
        while True:
            chunk = reader.read_line(_CHUNK)
            if not chunk:
                raise _ProtocolError("connection closed during DATA")
            if at_line_start:
                if chunk in (b".\r\n", b".\n"):
                    return b"".join(parts)
                if chunk.startswith(b"."):
                    chunk = chunk[1:]
            at_line_start = chunk.endswith(b"\n")
            size += len(chunk)
            if size > _MAX_MESSAGE:
                raise _ProtocolError("message too large")
            parts.append(chunk)
