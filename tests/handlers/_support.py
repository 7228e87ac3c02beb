"""Helpers for the handler tests: one opener, in memory or over loopback TCP.

``open_milter(milter, **offer)`` is an async context manager yielding a
negotiated `MilterClient`, with the same contract in both modes: leaving it
sends QUIT and waits for the milter to end the connection (so ``on_close``
has run), and if a handler panicked it raises `MilterPanic` from the
handler's exception.

- ``memory``: `triomilter.testing.open_in_memory`.
- ``tcp``: `triomilter.serve` on ``inet:0@127.0.0.1`` started with
  ``nursery.start``, and `triomilter.testing.open_tcp` to its port.

After a panic the server closes every connection, so over TCP only the
panicking command's reply is seen; tests of what follows use memory.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from triomilter import Milter, MilterPanic, serve
from triomilter._session import ServerState, serve_connection
from triomilter.testing import MilterClient, open_stream, open_tcp

OpenMilter = Callable[..., AbstractAsyncContextManager[MilterClient]]


@asynccontextmanager
async def open_served(milter: Milter, **offer: Any) -> AsyncIterator[MilterClient]:
    """A client over loopback TCP to ``serve(milter, "inet:0@127.0.0.1")``."""
    panic: MilterPanic | None = None
    failure: BaseException | None = None

    async def run_server(task_status: trio.TaskStatus[object]) -> None:
        nonlocal panic
        try:
            await serve(milter, "inet:0@127.0.0.1", handle_signals=False, task_status=task_status)
        except MilterPanic as exc:
            panic = exc

    async with trio.open_nursery() as nursery:
        address = await nursery.start(run_server)
        host, port = address[:2]
        try:
            async with open_tcp(host, port, **offer) as client:
                yield client
        except BaseException as exc:
            failure = exc
        # After a panic serve() ends by itself (raising MilterPanic): let it.
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    if panic is not None and (failure is None or isinstance(failure, Exception)):
        if failure is not None:
            panic.add_note(f"the test failed too: {failure!r}")
        raise panic
    if failure is not None:
        raise failure


class Sniffer(trio.abc.Stream):
    """The milter's side of an in-memory stream, recording every write."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.writes: list[bytes] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


@asynccontextmanager
async def open_sniffed(
    milter: Milter, **offer: Any
) -> AsyncIterator[tuple[MilterClient, list[bytes]]]:
    """A client in memory, plus the list of the milter's writes (exact bytes, per write)."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    sniffer = Sniffer(server_stream)
    state = ServerState()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_connection, milter, sniffer, state)
        async with open_stream(client_stream, settle=True, **offer) as client:
            yield client, sniffer.writes
    if state.panic is not None:
        raise MilterPanic("a handler panicked") from state.panic


def packet(code: bytes, data: bytes = b"") -> bytes:
    """One milter packet: length, code, data."""
    return (len(data) + 1).to_bytes(4, "big") + code + data


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The messages of the ERROR (and worse) records of the triomilter logger."""
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "triomilter" and record.levelno >= logging.ERROR
    ]
