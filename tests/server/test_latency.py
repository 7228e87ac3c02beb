"""No Nagle stalls (SPEC §3): TCP_NODELAY on accepted sockets, one write per command.

TCP_NODELAY is read from the server's own accepted socket (the server runs
in this process: its file descriptor is found through /proc/self/fd). "One
write" is seen from the client: the kernel counts the data segments a socket
received (``tcpi_data_segs_in``); with TCP_NODELAY every write on loopback is
its own segment, so everything owed for a command in one write is exactly
one segment (checked against a control that writes four times).
"""

from __future__ import annotations

import os
import socket as stdsocket
from pathlib import Path

import pytest
import trio

from triomilter import Actions, Context, Milter, Status, on_eom, on_rcpt
from triomilter.protocol import AddHeader, AddRecipient, ChangeHeader, Continue

from ._mta import RawMta
from ._support import TIMEOUT, has_ipv6_loopback, served

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/fd").is_dir() or not hasattr(stdsocket, "TCP_INFO"),
    reason="needs Linux (/proc/self/fd, TCP_INFO)",
)


@on_rcpt
async def rcpt(ctx: Context[None], args: list[str]) -> Status:
    return Status.CONTINUE


@on_eom
async def eom(ctx: Context[None]) -> Status:
    await ctx.api.add_header("X-One", "1")
    await ctx.api.replace_header("Subject", 1, "changed")
    await ctx.api.add_recipient("<c@example.net>")
    return Status.CONTINUE


three_changes = Milter(
    "three-changes",
    handlers=[rcpt, eom],
    actions=Actions.ADD_HEADER | Actions.REPLACE_HEADER | Actions.ADD_RECIPIENT,
)


def server_side_socket(client: RawMta) -> stdsocket.socket:
    """A duplicate of the server's accepted socket for ``client``'s connection."""
    mine = client.stream.socket
    want = (mine.getpeername(), mine.getsockname())
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = stdsocket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        try:
            if (sock.getsockname(), sock.getpeername()) == want:
                return sock
        except OSError:
            pass
        sock.close()
    raise AssertionError("the server's socket for this connection was not found")


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_accepted_sockets_have_tcp_nodelay(host: str) -> None:
    if host == "::1" and not has_ipv6_loopback():
        pytest.skip("no IPv6 loopback")
    family = "inet6" if ":" in host else "inet"
    async with served(three_changes, f"{family}:0@{host}") as srv:
        with trio.fail_after(TIMEOUT):
            clients = [await RawMta.to(srv.address) for _ in range(3)]
            for client in clients:
                await client.negotiate()  # the server has accepted it
                # Our own side has no TCP_NODELAY: the option checked is the server's.
                assert (
                    not client.stream.socket.getsockopt(
                        stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY
                    )
                    or client.stream.socket.family
                )
                with server_side_socket(client) as accepted:
                    assert accepted.getsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY)


async def segments_of_four_writes() -> int:
    """Control: four separate writes on a NODELAY loopback socket, as segments seen."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = RawMta(await trio.open_tcp_stream(*listener.getsockname()))
    server, _ = await listener.accept()
    server.setsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_NODELAY, 1)
    before = client.tcp_info_data_segs_in()
    for _ in range(4):
        await server.send(b"x" * 10)
        assert await client.stream.receive_some(100) == b"x" * 10
    count = client.tcp_info_data_segs_in() - before
    server.close()
    listener.close()
    await client.aclose()
    return count


async def test_everything_owed_for_a_command_is_one_write() -> None:
    if await segments_of_four_writes() != 4:
        pytest.skip("this kernel does not count received data segments (tcpi_data_segs_in)")
    async with served(three_changes) as srv:
        with trio.fail_after(TIMEOUT):
            client = await RawMta.to(srv.address)
            await client.negotiate()
            await client.connect()
            await client.mail()
            assert await client.rcpt() == Continue()
            await client.header("Subject", "original")
            await client.body(b"body\r\n")
            before = client.tcp_info_data_segs_in()
            replies = await client.eom()
            after = client.tcp_info_data_segs_in()
            assert replies == [
                AddHeader(b"X-One", b"1"),
                ChangeHeader(1, b"Subject", b"changed"),
                AddRecipient(b"<c@example.net>"),
                Continue(),
            ]
            # Three changes and the final reply: one segment, one read.
            assert after - before == 1
            assert len(client.chunks) == 1
            # And a plain command reply is one write too.
            before = client.tcp_info_data_segs_in()
            assert await client.rcpt() == Continue()
            assert client.tcp_info_data_segs_in() - before == 1
