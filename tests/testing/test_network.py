"""The client over loopback TCP and UNIX sockets, against any milter."""

from __future__ import annotations

import socket as stdsocket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

import triomilter
from triomilter import Actions, Context, Status
from triomilter.protocol import CONTINUE, Command, EndOfMessage, MilterConnection
from triomilter.protocol import AddHeader as WireAddHeader
from triomilter.testing import MilterTimeout, open_client, open_tcp, open_unix

from ._responder import Answer, Responder


def tagging_responder() -> Responder:
    def script(command: Command, conn: MilterConnection) -> Answer | None:
        if isinstance(command, EndOfMessage):
            return [WireAddHeader(b"X-Tag", b"net"), CONTINUE]
        return None

    return Responder(script=script)


@asynccontextmanager
async def serving(listener: trio.SocketListener, responder: Responder) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, responder.serve, [listener])
        yield
        nursery.cancel_scope.cancel()


async def tcp_listener() -> trio.SocketListener:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    return listener


async def unix_listener(path: Path) -> trio.SocketListener:
    sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
    await sock.bind(str(path))
    sock.listen(5)
    return trio.SocketListener(sock)


async def run_message(client: triomilter.testing.MilterClient) -> None:
    assert (await client.connect("mx", ("192.0.2.1", 25))).status is Status.CONTINUE
    assert (await client.helo("mx")).status is Status.CONTINUE
    result = await client.send_message("<a@b>", ["<c@d>"], {"Subject": "hi"}, b"body\r\n")
    assert result.has_added_header("X-Tag", "net")


async def test_tcp() -> None:
    responder = tagging_responder()
    listener = await tcp_listener()
    port = listener.socket.getsockname()[1]
    async with serving(listener, responder):
        async with open_tcp("127.0.0.1", port) as client:
            await run_message(client)
        with trio.fail_after(5):
            await responder.done.wait()
    assert responder.codes == "CHMRTLNBEQ"


async def test_unix(tmp_path: Path) -> None:
    responder = tagging_responder()
    path = tmp_path / "milter.sock"
    async with serving(await unix_listener(path), responder), open_unix(path) as client:
        await run_message(client)
    assert responder.codes == "CHMRTLNBEQ"


@pytest.mark.parametrize("kind", ["inet", "tuple", "unix", "local"])
async def test_open_client_with_socket_specs(kind: str, tmp_path: Path) -> None:
    responder = tagging_responder()
    path = tmp_path / "m.sock"
    listener = await unix_listener(path) if kind in ("unix", "local") else await tcp_listener()
    port = listener.socket.getsockname()[1] if kind in ("inet", "tuple") else 0
    target: str | tuple[str, int] = {
        "inet": f"inet:{port}@127.0.0.1",
        "tuple": ("127.0.0.1", port),
        "unix": f"unix:{path}",
        "local": f"local:{path}",
    }[kind]  # type: ignore[assignment]
    async with serving(listener, responder), open_client(target, timeout=5) as client:
        await run_message(client)
    assert responder.codes == "CHMRTLNBEQ"


async def test_open_client_with_a_stream() -> None:
    responder = tagging_responder()
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(responder.serve, server_stream)
        async with open_client(client_stream) as client:
            await run_message(client)
    assert responder.codes == "CHMRTLNBEQ"


async def test_connection_refused(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        async with open_unix(tmp_path / "nobody.sock"):
            pass  # pragma: no cover


async def test_connect_timeout(autojump_clock: trio.abc.Clock, tmp_path: Path) -> None:
    # A listener that never accepts still completes connects (backlog); a
    # milter that never negotiates is what times out.
    path = tmp_path / "mute.sock"
    listener = await unix_listener(path)
    with pytest.raises(MilterTimeout, match="OPTNEG"):
        async with open_unix(path, timeout=1):
            pass  # pragma: no cover
    await listener.aclose()


# --- against the real server -----------------------------------------------------------------


@triomilter.on_helo
async def refuse_spammer(ctx: Context[None], hostname: str) -> Status:
    if hostname == "spammer":
        ctx.api.set_error_reply(550, "5.7.1", ["Go away"])
        return Status.REJECT
    return Status.CONTINUE


@triomilter.on_eom
async def tag(ctx: Context[None]) -> Status:
    await ctx.api.add_header("X-Tag", "net")
    return Status.CONTINUE


SERVED = triomilter.Milter("net", handlers=[refuse_spammer, tag], actions=Actions.ADD_HEADER)


async def test_against_serve_over_tcp() -> None:
    async with trio.open_nursery() as nursery:
        address = await nursery.start(
            lambda task_status: triomilter.serve(
                SERVED, "inet:0@127.0.0.1", handle_signals=False, task_status=task_status
            )
        )
        host, port = address
        async with open_tcp(host, port) as client:
            await run_message(client)
            await client.quit_new_connection()
            await client.connect("spammer", ("192.0.2.9", 25))
            reply = await client.helo("spammer")
            assert (reply.status, reply.smtp_code, reply.lines) == (Status.REJECT, 550, ["Go away"])
        nursery.cancel_scope.cancel()
