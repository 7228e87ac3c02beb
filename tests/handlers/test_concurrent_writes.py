"""End-of-message changes written by two tasks at once must not interleave.

A handler may start background work on ``ctx.connection_nursery`` -- e.g. a
progress ticker calling ``signal_progress()`` while the handler itself sends
a large replacement body. Both write to the MTA socket; if a write is still
in progress (the MTA reads slowly, the socket buffer is full) a second write
must wait for it, else the packets interleave on the wire (a raw socket) or
the second write fails with BusyResourceError (a Trio stream) -- a panic.
The verdict of end of message must also wait for such a write.
"""

from __future__ import annotations

import trio
import trio.testing

from triomilter import Actions, Context, Milter, Status, on_eom
from triomilter._session import ServerState, serve_connection
from triomilter.testing import open_stream


class SlowStream(trio.abc.Stream):
    """The milter's side: every write takes a while; overlapping writes are recorded."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.writing = False
        self.overlaps = 0
        self.writes: list[bytes] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.writing:
            self.overlaps += 1
        self.writing = True
        try:
            await trio.sleep(0.01)  # a full socket buffer: the write waits
            self.writes.append(bytes(data))
            await self.inner.send_all(data)
        finally:
            self.writing = False

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


def ticking_milter() -> Milter:
    @on_eom
    async def eom(ctx: Context[None]) -> Status:
        done = trio.Event()

        async def ticker() -> None:
            for _ in range(3):
                await ctx.api.signal_progress()
            done.set()

        ctx.connection_nursery.start_soon(ticker)
        await ctx.api.append_body_chunk(b"x" * 70_000)
        await ctx.api.signal_progress()
        await ctx.api.append_body_chunk(b"y" * 10)
        await done.wait()
        return Status.CONTINUE

    return Milter("ticking", handlers=[eom], actions=Actions.REPLACE_BODY)


async def test_writes_of_a_handler_and_its_background_task_do_not_overlap() -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    slow = SlowStream(server_stream)
    state = ServerState()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, ticking_milter(), slow, state)
        async with open_stream(client_stream) as client:
            await client.connect("mx", None)
            await client.mail("<a@b>")
            await client.rcpt("<c@d>")
            result = await client.eom()
            assert result.status is Status.CONTINUE
            assert result.replaced_body == b"x" * 70_000 + b"y" * 10
    assert state.panic is None, repr(state.panic)
    assert slow.overlaps == 0
