"""Starting serve() and serve_listener(): the bound address, trio.run, inet, inet6, unix, fd."""

from __future__ import annotations

import contextlib
import functools
import os
import socket as stdsocket
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing

from triomilter import ServerOptions, serve_listener
from triomilter._sockets import SocketSpecError, listener_from_fd
from triomilter.protocol import AddHeader, Continue

from ._mta import RawMta
from ._support import HERE, TIMEOUT, Spawner, has_ipv6_loopback, served
from .sample_milters import milter

TAGGED = [AddHeader(b"X-Pid", str(os.getpid()).encode()), AddHeader(b"X-Client", b"mx.example")]


async def full_transaction(address: object) -> None:
    """A whole SMTP session through the milter; its end of message must be tagged."""
    with trio.fail_after(TIMEOUT):
        client = await RawMta.to(address)
        replies = await client.transaction()
        assert replies == [*TAGGED, Continue()]
        assert await client.read_until_closed() == b""  # QUIT: the milter closes


async def test_nursery_start_reports_the_bound_tcp_address() -> None:
    async with served(milter, "inet:0@127.0.0.1") as srv:
        host, port = srv.address
        assert host == "127.0.0.1"
        assert port != 0
        await full_transaction(srv.address)
        await full_transaction(srv.address)  # and it keeps serving


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback on this machine")
@pytest.mark.parametrize("spec", ["inet6:0@::1", "inet6:0@[::1]"])
async def test_inet6(spec: str) -> None:
    async with served(milter, spec) as srv:
        assert len(srv.address) == 4
        assert srv.address[0] == "::1"
        assert srv.address[1] != 0
        await full_transaction(srv.address)


@pytest.mark.parametrize("mode", [0o600, 0o660])
async def test_unix_socket_created_with_mode_and_removed_on_exit(sock_dir: Path, mode: int) -> None:
    path = sock_dir / "milter.sock"
    async with served(milter, f"unix:{path}", socket_mode=mode) as srv:
        assert srv.address == str(path)
        info = os.lstat(path)
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == mode
        await full_transaction(srv.address)
    assert srv.done.is_set()
    assert not path.exists()


def make_stale_socket(path: Path) -> None:
    """A socket file nobody listens on (a server that died without cleaning up)."""
    sock = stdsocket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


async def test_unix_stale_socket_file_is_removed(sock_dir: Path) -> None:
    path = sock_dir / "milter.sock"
    make_stale_socket(path)
    async with served(milter, f"unix:{path}") as srv:
        await full_transaction(srv.address)
    assert not path.exists()


async def test_unix_stale_socket_file_kept_when_removal_is_off(sock_dir: Path) -> None:
    from triomilter._sockets import SocketSpecError

    path = sock_dir / "milter.sock"
    make_stale_socket(path)
    with pytest.raises(SocketSpecError, match="stale"):
        async with served(milter, f"unix:{path}", remove_stale_socket=False):
            pass  # pragma: no cover
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


async def test_unix_live_socket_is_refused_and_left_alone(sock_dir: Path) -> None:
    from triomilter._sockets import SocketSpecError

    path = sock_dir / "milter.sock"
    async with served(milter, f"unix:{path}") as first:
        with pytest.raises(SocketSpecError, match="in use"):
            async with served(milter, f"unix:{path}"):
                pass  # pragma: no cover
        # The running server still owns its socket and serves.
        await full_transaction(first.address)
    assert not path.exists()


async def test_unix_regular_file_is_not_removed(sock_dir: Path) -> None:
    from triomilter._sockets import SocketSpecError

    path = sock_dir / "milter.sock"
    path.write_text("precious")
    with pytest.raises(SocketSpecError, match="not a socket"):
        async with served(milter, f"unix:{path}"):
            pass  # pragma: no cover
    assert path.read_text() == "precious"


async def test_trio_run_serve_in_a_process_stops_on_sigterm(spawn: Spawner, sock_dir: Path) -> None:
    """``trio.run(serve, milter, spec)`` as a program: serves, then SIGTERM exits 0."""
    path = sock_dir / "milter.sock"
    proc = spawn(str(HERE / "run_serve.py"), f"unix:{path}")
    await proc.wait_for_output("serving on")
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    await full_transaction_remote(str(path))
    proc.signal()
    assert await proc.wait() == 0, proc.output()
    assert not path.exists()


async def full_transaction_remote(path: str) -> None:
    with trio.fail_after(TIMEOUT):
        client = await RawMta.unix(path)
        replies = await client.transaction()
        assert replies[-1] == Continue()
        assert [type(r) for r in replies[:-1]] == [AddHeader, AddHeader]
        assert replies[1] == AddHeader(b"X-Client", b"mx.example")


async def test_unix_socket_file_removed_after_a_drain_and_after_a_panic(sock_dir: Path) -> None:
    from triomilter import MilterPanic

    path = sock_dir / "milter.sock"
    shutdown = trio.Event()
    async with served(milter, f"unix:{path}", shutdown=shutdown) as srv:
        shutdown.set()
        await srv.wait()
        assert srv.returned
        assert not path.exists()
    async with served(milter, f"unix:{path}") as srv:
        with trio.fail_after(TIMEOUT):
            client = await RawMta.to(srv.address)
            await client.negotiate()
            await client.connect()
            await client.helo("panic")
            await srv.wait()
        assert isinstance(srv.error, MilterPanic)
        assert not path.exists()


async def test_a_draining_server_leaves_its_successors_socket_alone(sock_dir: Path) -> None:
    """A restart: the old server drains while the new one already took over the path.

    When the old one finally exits it must not unlink the new one's socket.
    """
    path = sock_dir / "milter.sock"
    shutdown = trio.Event()
    with trio.fail_after(TIMEOUT):
        async with served(milter, f"unix:{path}", shutdown=shutdown) as old:
            busy = await RawMta.to(old.address)
            await busy.negotiate()
            await busy.connect()
            await busy.mail()  # a message in flight keeps the old server draining
            shutdown.set()
            await trio.testing.wait_all_tasks_blocked()
            # The old listener closes; the new server finds a stale file and replaces it.
            async with served(milter, f"unix:{path}") as new:
                assert not old.done.is_set()
                await full_transaction(new.address)
                # The old server's last message ends: it exits.
                await busy.rcpt()
                await busy.data()
                await busy.eoh()
                assert (await busy.eom())[-1] == Continue()
                await old.wait()
                assert old.returned
                # The new server's socket is still there and still serves.
                assert path.exists()
                await full_transaction(new.address)
            assert not path.exists()


# --- serve_listener: a listener opened by someone else ------------------------------------


async def test_serve_listener_on_a_tcp_listener_opened_here() -> None:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    options = ServerOptions(handle_signals=False)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(serve_listener, milter, listener, options)
        assert address == listener.socket.getsockname()
        await full_transaction(address)
        await full_transaction(address)
        nursery.cancel_scope.cancel()
    # serve_listener owns the listener it was given: closed when it returns.
    assert listener.socket.fileno() == -1


async def test_serve_listener_on_a_unix_listener_and_a_shutdown_event(sock_dir: Path) -> None:
    path = str(sock_dir / "given.sock")
    sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen()
    listener = trio.SocketListener(sock)
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        address = await nursery.start(
            functools.partial(
                serve_listener,
                milter,
                listener,
                ServerOptions(handle_signals=False),
                shutdown=shutdown,
            )
        )
        assert address == path
        await full_transaction(address)
        shutdown.set()  # returns by itself, after the drain
    assert listener.socket.fileno() == -1
    assert Path(path).is_socket()  # noqa: ASYNC240 - the file is the opener's to remove


async def test_serve_listener_from_an_inherited_descriptor() -> None:
    """``--socket fd:N`` (workers, systemd): a listening socket known only by its number."""
    with stdsocket.socket() as parent:
        parent.bind(("127.0.0.1", 0))
        parent.listen()
        fd = os.dup(parent.fileno())
    listener = listener_from_fd(fd)
    async with trio.open_nursery() as nursery:
        address = await nursery.start(
            serve_listener, milter, listener, ServerOptions(handle_signals=False)
        )
        await full_transaction(address)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: stdsocket.socket().detach(), "is not listening"),
        (lambda: stdsocket.socket(type=stdsocket.SOCK_DGRAM).detach(), "not a stream socket"),
        (lambda: 987654, "not an open socket"),
    ],
    ids=["not-listening", "datagram", "closed"],
)
def test_listener_from_fd_refuses_what_it_cannot_serve(
    make: Callable[[], int], message: str
) -> None:
    fd = make()
    try:
        with pytest.raises(SocketSpecError, match=message):
            listener_from_fd(fd)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
