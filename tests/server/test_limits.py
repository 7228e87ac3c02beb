"""max_connections answers the excess TEMPFAIL at once; io_timeout closes idle connections."""

from __future__ import annotations

import logging
import re
import signal

import pytest
import trio
import trio.testing

from triomilter import Context, Metrics, Milter, SocketInfo, Status, on_close, on_connect
from triomilter.protocol import Continue, OptionNegotiationReply, Tempfail

from ._mta import POSTFIX_OFFER, RawMta
from ._support import TIMEOUT, Spawner, connection_records, free_port, served, wait_until
from .sample_milters import milter


async def test_over_the_limit_a_connection_is_answered_tempfail_at_once(
    logs: pytest.LogCaptureFixture,
) -> None:
    """Never a silent lockout: the MTA is told at once, and the operator once."""
    metrics = Metrics()
    async with served(milter, max_connections=2, metrics=metrics) as srv:
        with trio.fail_after(TIMEOUT):
            first = await RawMta.to(srv.address)
            await first.negotiate()
            second = await RawMta.to(srv.address)
            await second.negotiate()
            # The third is negotiated with nothing asked, TEMPFAIL at connect, closed.
            third = await RawMta.to(srv.address)
            assert (await third.negotiate()).opts == 0
            assert await third.connect() == Tempfail()
            assert await third.read_until_closed() == b""
            fourth = await RawMta.to(srv.address)
            await fourth.negotiate()
            assert await fourth.connect() == Tempfail()
            # The first two keep working meanwhile.
            assert await first.connect() == Continue()
            assert await second.connect() == Continue()
            # One of them leaves: the next connection is served normally.
            await first.quit()
            assert await first.read_until_closed() == b""
            await wait_until(
                lambda: any("below the connection limit" in r.getMessage() for r in logs.records)
            )
            fifth = await RawMta.to(srv.address)
            await fifth.negotiate()
            assert await fifth.connect() == Continue()
            assert await fifth.helo() == Continue()
    warnings = [r.getMessage() for r in logs.records if "connection limit of 2" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert metrics.connection_limit_hits == 2
    assert any("2 connection(s) were answered TEMPFAIL" in r.getMessage() for r in logs.records)


async def test_io_timeout_closes_an_idle_connection(logs: pytest.LogCaptureFixture) -> None:
    closed: list[str] = []

    @on_connect
    async def connect(ctx: Context[str], hostname: str, address: SocketInfo | None) -> Status:
        ctx.data = hostname
        return Status.CONTINUE

    @on_close
    async def close(ctx: Context[str]) -> None:
        closed.append(ctx.data or "?")

    tracking = Milter("tracking", handlers=[connect, close])
    async with served(tracking, io_timeout=0.5) as srv:
        with trio.fail_after(TIMEOUT):
            silent = await RawMta.to(srv.address)  # never says a word
            idle = await RawMta.to(srv.address)
            await idle.negotiate()
            assert await idle.connect("idle-host") == Continue()
            # Say nothing more: the milter closes the connection (EOF), on_close runs.
            assert await idle.read_until_closed() == b""
            assert closed == ["idle-host"]
            assert await silent.read_until_closed() == b""
            # The server keeps serving.
            fresh = await RawMta.to(srv.address)
            await fresh.negotiate()
            assert await fresh.connect("fresh-host") == Continue()
            await fresh.quit()
            assert await fresh.read_until_closed() == b""
            assert closed == ["idle-host", "fresh-host"]
            assert not srv.done.is_set()
    for connection_id in ("#1", "#2"):
        [line] = connection_records(logs, connection_id, logging.WARNING)
        assert "0.5 s" in line.getMessage()
        assert "closing the connection" in line.getMessage()


async def test_out_of_descriptors_is_logged_once_per_episode(spawn: Spawner) -> None:
    """EMFILE: the accept loop retries every 100 ms, logging once, then says it recovered."""
    port = free_port()
    proc = spawn(
        "-c",
        "import resource, runpy, sys; "
        "resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48)); "
        "sys.argv = ['triomilter', *sys.argv[1:]]; "
        "runpy.run_module('triomilter', run_name='__main__')",
        "serve",
        "tests/server/sample_milters.py",
        "--socket",
        f"inet:{port}@127.0.0.1",
    )
    await proc.wait_for_output("serving on")
    assert "open files allowed (RLIMIT_NOFILE" in proc.output()  # told at start
    held: list[RawMta] = []
    with trio.fail_after(TIMEOUT):
        for _ in range(60):  # more than there are descriptors
            client = await RawMta.to(("127.0.0.1", port))
            await client.send_raw(client.mta.send(POSTFIX_OFFER))
            held.append(client)
        await proc.wait_for_output("accept failed (Too many open files)")
        await trio.sleep(0.5)  # several retries fail meanwhile: still one line
        for client in held[:40]:
            await client.aclose()
        await proc.wait_for_output("accepting again after")
        # The ones that waited in the backlog are served now.
        assert isinstance((await held[-1].replies())[0], OptionNegotiationReply)
    out = proc.output()
    assert out.count("accept failed") == 1, out
    match = re.search(r"accepting again after (\d+) failed attempt", out)
    assert match and int(match.group(1)) >= 2, out
    proc.signal(signal.SIGTERM)
    assert await proc.wait() == 0
