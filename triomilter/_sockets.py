"""libmilter socket specs (``inet:PORT@HOST``, ``inet6:...``, ``unix:/path``) and listeners."""

from __future__ import annotations

import contextlib
import errno
import os
import socket as stdsocket
import stat

import attrs
import trio

from ._context import SocketFamily


class SocketSpecError(ValueError):
    """A socket spec that cannot be used, with the reason."""


@attrs.frozen
class SocketSpec:
    """A parsed socket spec: a TCP ``host`` and ``port``, or a UNIX socket ``path``."""

    family: SocketFamily
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.family is SocketFamily.UNIX:
            return f"unix:{self.path}"
        return (
            f"{self.family}:{self.port}@{self.host}" if self.host else f"{self.family}:{self.port}"
        )


_ALIASES = {
    "inet": SocketFamily.INET,
    "inet6": SocketFamily.INET6,
    "unix": SocketFamily.UNIX,
    "local": SocketFamily.UNIX,
}


def parse_socket_spec(spec: str) -> SocketSpec:
    """Parse a socket spec with libmilter's syntax (``smfi_setconn``).

    ``inet:PORT[@HOST]``, ``inet6:PORT[@HOST]``, ``unix:PATH`` or ``local:PATH``;
    a spec without ``proto:`` is a UNIX socket path. Protocol names are
    case-insensitive; PORT is a number or a service name; HOST may be in
    brackets (``inet:8894@[127.0.0.1]``, ``inet6:8894@[::1]``, as libmilter
    accepts); without HOST every address is bound. Raises `SocketSpecError`
    with the reason.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise SocketSpecError(f"empty socket spec {spec!r}: use inet:PORT@HOST or unix:/path")
    spec = spec.strip()
    proto, sep, rest = spec.partition(":")
    if not sep:
        return _unix(spec, spec)
    family = _ALIASES.get(proto.lower())
    if family is None:
        if "/" in proto:  # a path containing a colon
            return _unix(spec, spec)
        raise SocketSpecError(
            f"unknown protocol {proto!r} in socket spec {spec!r}: use inet, inet6, unix or local"
        )
    if family is SocketFamily.UNIX:
        return _unix(spec, rest)
    port_text, at, host = rest.partition("@")
    if not port_text:
        raise SocketSpecError(f"socket spec {spec!r} has no port: use {family}:PORT@HOST")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if at and not host:
        raise SocketSpecError(f"socket spec {spec!r} has '@' but no host")
    return SocketSpec(family, host, _port(spec, port_text))


def _unix(spec: str, path: str) -> SocketSpec:
    if not path:
        raise SocketSpecError(f"socket spec {spec!r} has no path: use unix:/path/to/socket")
    if "\0" in path:
        raise SocketSpecError(f"socket spec {spec!r}: the path contains a NUL byte")
    if len(os.fsencode(path)) > 107:
        raise SocketSpecError(f"socket spec {spec!r}: UNIX socket paths are limited to 107 bytes")
    return SocketSpec(SocketFamily.UNIX, path=path)


def _port(spec: str, text: str) -> int:
    if text.isdigit():
        port = int(text)
    else:
        try:
            port = stdsocket.getservbyname(text, "tcp")
        except OSError:
            raise SocketSpecError(
                f"socket spec {spec!r}: port {text!r} is neither a number nor a known service"
            ) from None
    if not 0 <= port <= 65535:
        raise SocketSpecError(f"socket spec {spec!r}: port {port} is out of range 0-65535")
    return port


async def open_listener(
    spec: SocketSpec,
    *,
    backlog: int | None = None,
    reuse_port: bool = False,
    remove_stale_socket: bool = True,
    socket_mode: int | None = None,
) -> trio.SocketListener:
    """Bind and listen on ``spec``; the caller closes the listener (and the UNIX path)."""
    backlog = backlog if backlog is not None else stdsocket.SOMAXCONN
    if spec.family is SocketFamily.UNIX:
        return await _open_unix(spec.path, backlog, remove_stale_socket, socket_mode)
    family = stdsocket.AF_INET6 if spec.family is SocketFamily.INET6 else stdsocket.AF_INET
    host = spec.host or ("::" if family == stdsocket.AF_INET6 else "0.0.0.0")
    try:
        infos = await trio.socket.getaddrinfo(
            host, spec.port, family, stdsocket.SOCK_STREAM, 0, stdsocket.AI_PASSIVE
        )
    except (stdsocket.gaierror, UnicodeError) as exc:  # UnicodeError: not a valid host name
        raise SocketSpecError(f"socket spec {spec}: cannot resolve host {host!r}: {exc}") from None
    sockaddr = infos[0][4]
    sock = trio.socket.socket(family, stdsocket.SOCK_STREAM)
    try:
        sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_REUSEPORT, 1)
        if family == stdsocket.AF_INET6:
            sock.setsockopt(stdsocket.IPPROTO_IPV6, stdsocket.IPV6_V6ONLY, 1)
        await sock.bind(sockaddr)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise SocketSpecError(f"cannot listen on {spec}: {exc.strerror or exc}") from exc
    return trio.SocketListener(sock)


async def _open_unix(
    path: str, backlog: int, remove_stale: bool, mode: int | None
) -> trio.SocketListener:
    with contextlib.suppress(FileNotFoundError):
        info = os.lstat(path)
        if not stat.S_ISSOCK(info.st_mode):
            raise SocketSpecError(f"{path} exists and is not a socket; not removing it")
        if not remove_stale:
            raise SocketSpecError(f"{path} exists (stale socket removal is off)")
        if await _socket_alive(path):
            raise SocketSpecError(f"{path} is in use by a running server")
        os.unlink(path)
    sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    try:
        await sock.bind(path)
        if mode is not None:
            os.chmod(path, mode)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise SocketSpecError(f"cannot listen on unix:{path}: {exc.strerror or exc}") from exc
    return trio.SocketListener(sock)


async def _socket_alive(path: str) -> bool:
    probe = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    try:
        with trio.move_on_after(1):
            await probe.connect(path)
            return True
        return True  # connect hung: someone holds it
    except OSError as exc:
        return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        probe.close()


def describe_address(address: object) -> str:
    """A bound address (``getsockname()``) as a socket spec, as MTAs are configured with."""
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        family = SocketFamily.INET6 if ":" in str(host) else SocketFamily.INET
        return f"{family}:{port}@{host}"
    if isinstance(address, bytes):
        address = os.fsdecode(address)
    if isinstance(address, str) and address:
        return f"unix:{address}"
    return "an open listener"


def listener_from_fd(fd: int) -> trio.SocketListener:
    """A listener on a socket that is already open and listening, by descriptor.

    For a socket inherited from a parent process (``--workers``) or passed by
    systemd (socket activation). Raises `SocketSpecError` if ``fd`` is not a
    listening stream socket.
    """
    try:
        sock = stdsocket.socket(fileno=fd)
    except OSError as exc:
        raise SocketSpecError(f"fd:{fd} is not an open socket: {exc.strerror or exc}") from None
    try:
        if sock.type != stdsocket.SOCK_STREAM:
            raise SocketSpecError(f"fd:{fd} is not a stream socket")
        if not sock.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_ACCEPTCONN):
            raise SocketSpecError(f"fd:{fd} is not listening")
    except SocketSpecError:
        sock.detach()  # not ours to close
        raise
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))
