"""When deadlines fire, on Trio's virtual clock (exact and instant, no timing on a busy machine).

With `trio.testing.MockClock` (pytest-trio's ``autojump_clock``) time moves
only when every task waits, so "when" is a deterministic number.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from triomilter import Context, Milter, ServerOptions, Status, on_eom, on_helo, on_mail
from triomilter._session import serve_connection
from triomilter.protocol import (
    ALL_ACTIONS,
    ALL_PROTOCOL_OPTS,
    CONTINUE,
    NEED_DATA,
    PROGRESS,
    TEMPFAIL,
    Actions,
    AddHeader,
    Command,
    EndOfMessage,
    Helo,
    Mail,
    MtaConnection,
    OptionNegotiation,
)


class Mta:
    """The MTA's end of an in-memory connection to ``serve_connection``."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = MtaConnection()

    async def send(self, command: Command) -> None:
        await self.stream.send_all(self.conn.send(command))

    async def replies(self) -> list[object]:
        """The replies up to the final one of the command awaiting it."""
        out: list[object] = []
        while self.conn.awaiting is not None:
            event = self.conn.next_event()
            if event is NEED_DATA:
                data = await self.stream.receive_some()
                assert data, "the milter closed the connection"
                self.conn.receive_data(data)
                continue
            out.append(event)
        return out

    async def closed_at(self) -> float:
        """The (virtual) time the milter closes the connection."""
        while await self.stream.receive_some():
            pass
        return trio.current_time()


async def session(milter: Milter, options: ServerOptions, nursery: trio.Nursery) -> Mta:
    mta_side, milter_side = trio.testing.memory_stream_pair()
    limits = options.limits_for(milter)
    nursery.start_soon(serve_connection, milter, milter_side, None, limits, "virtual")
    mta = Mta(mta_side)
    await mta.send(OptionNegotiation(6, ALL_ACTIONS, ALL_PROTOCOL_OPTS))
    await mta.replies()
    return mta


@on_helo
async def helo(ctx: Context[None], hostname: str) -> Status:
    if hostname == "hang":
        await trio.sleep_forever()
    return Status.CONTINUE


@pytest.mark.parametrize("timeout", [1.0, 10.0, 7210.0])
async def test_the_io_timeout_fires_within_ten_percent(
    timeout: float, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        milter = Milter("idle", handlers=[helo])
        mta = await session(milter, ServerOptions(io_timeout=timeout), nursery)
        idle_since = trio.current_time()
        elapsed = await mta.closed_at() - idle_since
    assert timeout <= elapsed <= timeout * 1.1


async def test_a_packet_must_be_complete_within_the_io_timeout_of_its_first_byte(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """One byte a second keeps the I/O going; the packet's deadline still runs."""
    options = ServerOptions(io_timeout=10.0)
    async with trio.open_nursery() as nursery:
        mta = await session(Milter("trickle", handlers=[helo]), options, nursery)
        packet = mta.conn.send(Helo(b"a-long-host-name.example"))
        first_byte = trio.current_time()
        closed = trio.Event()
        times: list[float] = []

        async def watch() -> None:
            times.append(await mta.closed_at())
            closed.set()

        nursery.start_soon(watch)
        for byte in packet:
            if closed.is_set():
                break
            await mta.stream.send_all(bytes((byte,)))
            await trio.sleep(1)
        await closed.wait()
    assert len(packet) > 20  # longer than the deadline, at a byte a second
    assert 10.0 <= times[0] - first_byte <= 11.0


async def test_a_handler_deadline_is_exact_and_the_connection_goes_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    options = ServerOptions(handler_timeout=3.0)
    async with trio.open_nursery() as nursery:
        mta = await session(Milter("hang", handlers=[helo]), options, nursery)
        started = trio.current_time()
        await mta.send(Helo(b"hang"))
        assert await mta.replies() == [TEMPFAIL]
        assert trio.current_time() - started == 3.0
        await mta.send(Helo(b"fine"))
        assert await mta.replies() == [CONTINUE]
        nursery.cancel_scope.cancel()


async def test_a_slow_end_of_message_gets_progress_at_its_interval_and_its_own_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    @on_eom
    async def eom(ctx: Context[None]) -> Status:
        await trio.sleep(12.5)
        await ctx.api.add_header("X-Scanned", "yes")
        return Status.CONTINUE

    @on_mail
    async def mail(ctx: Context[None], args: list[str]) -> Status:
        return Status.CONTINUE

    milter = Milter("scan", handlers=[mail, eom], actions=Actions.ADD_HEADER)
    options = ServerOptions(handler_timeout=1.0, eom_timeout=20.0, progress_interval=5.0)
    async with trio.open_nursery() as nursery:
        mta = await session(milter, options, nursery)
        await mta.send(Mail((b"<a@b>",)))
        assert await mta.replies() == [CONTINUE]
        await mta.send(EndOfMessage())
        replies = await mta.replies()
        nursery.cancel_scope.cancel()
    # Progress at 5 s and 10 s; the end-of-message deadline (20 s), not the
    # handler deadline (1 s), applies.
    assert replies[:2] == [PROGRESS, PROGRESS]
    assert replies[2:] == [AddHeader(b"X-Scanned", b"yes"), CONTINUE]
