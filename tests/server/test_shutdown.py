"""Graceful shutdown (event and signals), the grace period, a second signal, cancellation."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import trio
import trio.testing

from triomilter import Context, Milter, SocketInfo, Status, on_connect, on_helo
from triomilter.protocol import AddHeader, Continue, Helo, Tempfail

from ._mta import RawMta
from ._support import TIMEOUT, Proc, Spawner, free_port, served
from .sample_milters import milter

TAGGED = [AddHeader(b"X-Pid", str(os.getpid()).encode()), AddHeader(b"X-Client", b"busy")]


async def open_session(address: object, hostname: str) -> RawMta:
    client = await RawMta.to(address)
    await client.negotiate()
    assert await client.connect(hostname) == Continue()
    assert await client.helo() == Continue()
    return client


async def start_message(client: RawMta) -> None:
    """MAIL, RCPT, DATA and a header: the connection is now in a message."""
    await client.macros("M", i="QID1")
    assert await client.mail() == Continue()
    assert await client.rcpt() == Continue()
    assert await client.data() == Continue()
    assert await client.header("Subject", "in flight") == Continue()


async def finish_message(client: RawMta) -> list[object]:
    assert await client.eoh() == Continue()
    assert await client.body(b"body\r\n") == Continue()
    return list(await client.eom())


async def test_shutdown_event_lets_the_message_in_flight_finish(
    logs: pytest.LogCaptureFixture,
) -> None:
    shutdown = trio.Event()
    async with served(milter, shutdown=shutdown, shutdown_grace=3 * TIMEOUT) as srv:
        with trio.fail_after(TIMEOUT):
            port = srv.address[1]
            busy = await open_session(srv.address, "busy")
            idle = await open_session(srv.address, "idle")
            await start_message(busy)

            shutdown.set()
            await trio.testing.wait_all_tasks_blocked()  # the drain has begun
            assert "shutting down: 1 message(s) in flight" in logs.text

            # A new message on the idle connection is refused for now...
            assert await idle.mail() == Tempfail()
            # ...no new connection is served...
            with pytest.raises(OSError):
                await trio.open_tcp_stream("127.0.0.1", port)
            # ...while the message in flight ends normally, changes included.
            assert not srv.done.is_set()
            assert await finish_message(busy) == [*TAGGED, Continue()]
            # Then serve() returns and every connection is closed.
            await srv.wait()
            assert srv.returned and srv.error is None
            assert await busy.read_until_closed() == b""
            assert await idle.read_until_closed() == b""


async def test_shutdown_grace_expiring_closes_connections_still_in_a_message(
    logs: pytest.LogCaptureFixture,
) -> None:
    shutdown = trio.Event()
    async with served(milter, shutdown=shutdown, shutdown_grace=0.2) as srv:
        with trio.fail_after(TIMEOUT):
            stuck = await open_session(srv.address, "stuck")
            await start_message(stuck)
            shutdown.set()
            # The MTA never finishes the message: after the grace it is closed.
            assert await stuck.read_until_closed() == b""
            await srv.wait()
            assert srv.returned and srv.error is None
    assert "shutdown grace over with 1 message(s) still in flight" in logs.text


async def test_cancelling_serve_is_an_immediate_clean_stop(sock_dir: Path) -> None:
    entered = trio.Event()

    @on_connect
    async def connect(ctx: Context[None], hostname: str, address: SocketInfo | None) -> Status:
        return Status.CONTINUE

    @on_helo
    async def helo(ctx: Context[None], hostname: str) -> Status:
        if hostname == "forever":
            entered.set()
            await trio.sleep_forever()
        return Status.CONTINUE

    hanging = Milter("hanging", handlers=[connect, helo])
    path = sock_dir / "m.sock"
    async with served(hanging, f"unix:{path}", shutdown_grace=1000.0, panic_grace=1000.0) as srv:
        with trio.fail_after(TIMEOUT):
            idle = await RawMta.to(srv.address)
            await idle.negotiate()
            busy = await RawMta.to(srv.address)
            await busy.negotiate()
            assert await busy.connect() == Continue()
            await busy.send_raw(busy.mta.send(Helo(b"forever")))
            await entered.wait()
            assert srv.cancel_scope is not None
            srv.cancel_scope.cancel()
            await srv.wait()
            assert not srv.returned and srv.error is None  # cancelled, nothing raised
            assert not path.exists()
            assert await idle.read_until_closed() == b""
            assert await busy.read_until_closed() == b""


# --- signals, through the command line in a subprocess ---------------------------------


async def start_cli(spawn: Spawner, *options: str) -> tuple[Proc, tuple[str, int]]:
    port = free_port()
    proc = spawn(
        "-m",
        "triomilter",
        "serve",
        "tests/server/sample_milters.py",
        "--socket",
        f"inet:{port}@127.0.0.1",
        *options,
    )
    await proc.wait_for_output("serving on")
    return proc, ("127.0.0.1", port)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_drains_then_exits_0(spawn: Spawner, signum: int) -> None:
    proc, address = await start_cli(spawn, "--shutdown-grace", str(3 * TIMEOUT))
    with trio.fail_after(TIMEOUT):
        busy = await open_session(address, "busy")
        idle = await open_session(address, "idle")
        await start_message(busy)
        proc.signal(signum)
        await proc.wait_for_output("shutting down: 1 message(s) in flight")
        assert await idle.mail() == Tempfail()
        replies = await finish_message(busy)
        assert replies[-1] == Continue()
        assert replies[:-1] == [AddHeader(b"X-Pid", str(proc.pid).encode()), TAGGED[1]]
        assert await proc.wait() == 0, proc.output()
        assert await busy.read_until_closed() == b""
        assert await idle.read_until_closed() == b""


async def test_second_signal_stops_at_once(spawn: Spawner) -> None:
    proc, address = await start_cli(spawn, "--shutdown-grace", "1000")
    with trio.fail_after(TIMEOUT):
        busy = await open_session(address, "busy")
        await start_message(busy)
        proc.signal(signal.SIGTERM)
        await proc.wait_for_output("shutting down: 1 message(s) in flight")
        proc.signal(signal.SIGTERM)
        # Far less than the 1000 s grace: the message in flight is cut off, and
        # the exit status says the stop was forced (128 + SIGTERM).
        assert await proc.wait() == 128 + signal.SIGTERM, proc.output()
        assert "SIGTERM again: stopping now" in proc.output()
        assert await busy.read_until_closed() == b""
