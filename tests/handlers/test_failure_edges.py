"""Edge cases of failure handling: async callables, failing nurseries, a lost MTA."""

from __future__ import annotations

import pytest
import trio

from triomilter import Context, Milter, MilterPanic, Status, on_helo
from triomilter.testing import open_in_memory


class AsyncCallable:
    """An async callable object: inspect.iscoroutinefunction misses it."""

    async def __call__(self, ctx: Context[None], hostname: str) -> Status:
        return Status.REJECT


async def test_an_async_callable_object_is_awaited() -> None:
    helo = on_helo(AsyncCallable())
    async with open_in_memory(Milter("m", handlers=[helo])) as client:
        assert (await client.helo("x")).status is Status.REJECT


async def test_a_failing_nursery_inside_a_handler_is_a_panic_not_a_crash() -> None:
    error = ValueError("inner task failed")

    async def fail() -> None:
        raise error

    @on_helo
    async def helo(ctx: Context[None], hostname: str) -> Status:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fail)
            nursery.start_soon(trio.sleep_forever)
        return Status.CONTINUE  # pragma: no cover

    with pytest.raises(MilterPanic) as info:
        async with open_in_memory(Milter("m", handlers=[helo])) as client:
            assert (await client.helo("x")).status is Status.TEMPFAIL
    cause = info.value.__cause__
    assert isinstance(cause, BaseExceptionGroup) and cause.exceptions == (error,)


async def test_mta_gone_while_changes_are_written_ends_only_that_connection() -> None:
    """ConnectionLost in a Status handler is not a panic: the MTA went away."""
    from triomilter import Actions, on_close, on_eom, serve
    from triomilter.protocol import (
        ALL_ACTIONS,
        ALL_PROTOCOL_OPTS,
        EndOfMessage,
        MtaConnection,
        OptionNegotiation,
    )

    closed = trio.Event()
    writing = trio.Event()

    @on_eom
    async def eom(ctx: Context[None]) -> Status:
        writing.set()
        await trio.sleep(0.2)  # the MTA hangs up meanwhile
        for _ in range(64):  # far more than the socket buffers: the write fails
            await ctx.api.append_body_chunk(b"x" * 65535)
        return Status.CONTINUE  # pragma: no cover

    @on_close
    async def close(ctx: Context[None]) -> None:
        closed.set()

    milter = Milter("m", handlers=[eom, close], actions=Actions.REPLACE_BODY)
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(
                lambda task_status: serve(
                    milter, "inet:0@127.0.0.1", handle_signals=False, task_status=task_status
                )
            )
            stream = await trio.open_tcp_stream(host, port)
            mta = MtaConnection()
            await stream.send_all(mta.send(OptionNegotiation(6, ALL_ACTIONS, ALL_PROTOCOL_OPTS)))
            while mta.awaiting is not None:
                mta.receive_data(await stream.receive_some())
                mta.next_event()
            await stream.send_all(mta.send(EndOfMessage()))  # only EOM is handled (NO_*)
            await writing.wait()
            stream.socket.setsockopt(
                trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0"
            )
            await stream.aclose()  # reset: the milter's writes fail
            await closed.wait()  # on_close ran: the connection ended normally
            # The server still serves.
            other = await trio.open_tcp_stream(host, port)
            mta2 = MtaConnection()
            await other.send_all(mta2.send(OptionNegotiation(6, ALL_ACTIONS, ALL_PROTOCOL_OPTS)))
            assert await other.receive_some()
            await other.aclose()
            nursery.cancel_scope.cancel()
