"""Opening a test session: over a stream, TCP, a UNIX socket, or in memory.

Every opener is an async context manager that connects, negotiates (like
Postfix 3.x unless told otherwise) and yields a `MilterClient`; leaving the
block sends QUIT (unless the test did, or the session failed) and closes the
connection. Exceptions from the block come out as they are, never wrapped in
an exception group.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import attrs
import trio
import trio.testing

from .._context import SocketFamily
from .._errors import MilterPanic
from .._milter import Milter
from .._options import ServerOptions
from .._session import ServerState, serve_connection
from .._sockets import parse_socket_spec
from ..protocol import MAX_DATA_SIZE, Actions, OptionNegotiation, ProtocolOpts
from ._client import (
    DEFAULT_TIMEOUT,
    POSTFIX_ACTIONS,
    POSTFIX_OPTS,
    POSTFIX_VERSION,
    MilterClient,
)
from ._errors import MilterTimeout


@asynccontextmanager
async def open_stream(
    stream: trio.abc.Stream,
    *,
    actions: Actions = POSTFIX_ACTIONS,
    opts: ProtocolOpts = POSTFIX_OPTS,
    version: int = POSTFIX_VERSION,
    timeout: float = DEFAULT_TIMEOUT,
    settle: bool = False,
) -> AsyncIterator[MilterClient]:
    """A session over ``stream``, already connected to a milter; the stream is closed after.

    ``actions``, ``opts`` and ``version`` are the MTA's offer; ``timeout``
    bounds each step (and the negotiation). ``settle=True`` is for a milter
    running in this Trio run (say over ``trio.testing.memory_stream_pair``):
    before each step the client waits until every task is blocked, so a
    reply the milter sent when none was due is always reported at the next
    step rather than sometimes later.
    """
    offer = OptionNegotiation(version, actions, opts)
    async with _session(stream, offer, timeout, settle=settle) as client:
        yield client


@asynccontextmanager
async def open_tcp(
    host: str,
    port: int,
    *,
    actions: Actions = POSTFIX_ACTIONS,
    opts: ProtocolOpts = POSTFIX_OPTS,
    version: int = POSTFIX_VERSION,
    timeout: float = DEFAULT_TIMEOUT,
) -> AsyncIterator[MilterClient]:
    """A session with the milter listening on TCP ``host``:``port`` (any implementation)."""
    stream = await _connect(timeout, f"{host}:{port}", trio.open_tcp_stream, host, port)
    async with _session(stream, OptionNegotiation(version, actions, opts), timeout) as client:
        yield client


@asynccontextmanager
async def open_unix(
    path: str | os.PathLike[str],
    *,
    actions: Actions = POSTFIX_ACTIONS,
    opts: ProtocolOpts = POSTFIX_OPTS,
    version: int = POSTFIX_VERSION,
    timeout: float = DEFAULT_TIMEOUT,
) -> AsyncIterator[MilterClient]:
    """A session with the milter listening on the UNIX socket ``path``."""
    stream = await _connect(timeout, str(path), trio.open_unix_socket, path)
    async with _session(stream, OptionNegotiation(version, actions, opts), timeout) as client:
        yield client


@asynccontextmanager
async def open_in_memory(
    milter: Milter[Any, Any],
    *,
    actions: Actions = POSTFIX_ACTIONS,
    opts: ProtocolOpts = POSTFIX_OPTS,
    version: int = POSTFIX_VERSION,
    timeout: float = DEFAULT_TIMEOUT,
    max_data_size: int = MAX_DATA_SIZE,
    options: ServerOptions | None = None,
) -> AsyncIterator[MilterClient]:
    """A session with ``milter`` run in this process over an in-memory stream (no socket).

    The milter serves the connection exactly as `triomilter.serve` would
    with ``options`` (connection id ``"test"``, its logs go to the
    ``triomilter`` logger): handler deadlines, exception policy and all.
    If a handler panicked, leaving the block raises `triomilter.MilterPanic`
    with the handler's exception as ``__cause__`` (after the replies the
    test saw: TEMPFAIL from the panicking step on).
    """
    client_stream, server_stream = trio.testing.memory_stream_pair()
    options = options if options is not None else ServerOptions()
    if max_data_size != MAX_DATA_SIZE:
        options = attrs.evolve(options, max_data_size=max_data_size)
    state = ServerState(thread_limit=options.thread_limit)
    limits = options.limits_for(milter)

    async def run_milter() -> None:
        await serve_connection(milter, server_stream, state, limits, "test")

    offer = OptionNegotiation(version, actions, opts)
    async with _session(client_stream, offer, timeout, run_milter, state) as client:
        yield client


def open_client(
    target: Milter | str | tuple[str, int] | trio.abc.Stream,
    *,
    actions: Actions = POSTFIX_ACTIONS,
    opts: ProtocolOpts = POSTFIX_OPTS,
    version: int = POSTFIX_VERSION,
    timeout: float = DEFAULT_TIMEOUT,
) -> AbstractAsyncContextManager[MilterClient]:
    """Open a session with whatever ``target`` is.

    A `triomilter.Milter` runs in memory (`open_in_memory`); a socket spec
    with libmilter's syntax (``"inet:8894@127.0.0.1"``, ``"inet6:8894@::1"``,
    ``"unix:/run/milter.sock"``) or a ``(host, port)`` tuple connects to a
    running milter (`open_tcp`, `open_unix`); a stream is used as it is.
    """
    if isinstance(target, Milter):
        return open_in_memory(target, actions=actions, opts=opts, version=version, timeout=timeout)
    if isinstance(target, trio.abc.Stream):
        return open_stream(target, actions=actions, opts=opts, version=version, timeout=timeout)
    if isinstance(target, tuple):
        host, port = target
    else:
        spec = parse_socket_spec(target)
        if spec.family is SocketFamily.UNIX:
            return open_unix(
                spec.path, actions=actions, opts=opts, version=version, timeout=timeout
            )
        host = spec.host or ("::1" if spec.family is SocketFamily.INET6 else "127.0.0.1")
        port = spec.port
    return open_tcp(host, port, actions=actions, opts=opts, version=version, timeout=timeout)


@asynccontextmanager
async def _session(
    stream: trio.abc.Stream,
    offer: OptionNegotiation,
    timeout: float,
    run_milter: Callable[[], Awaitable[None]] | None = None,
    state: ServerState | None = None,
    *,
    settle: bool = False,
) -> AsyncIterator[MilterClient]:
    """Run the client's reader (and the milter, in memory) around the test's block.

    The block runs inside a nursery, but its exception is caught and raised
    again after the nursery is gone, so the test sees it unwrapped.
    """
    client = MilterClient(stream, timeout=timeout, settle=settle or run_milter is not None)
    failure: BaseException | None = None
    milter_error: Exception | None = None
    milter_done = trio.Event()

    async def serve_milter(run: Callable[[], Awaitable[None]]) -> None:
        nonlocal milter_error
        try:
            await run()
        except Exception as exc:  # reported after the session, unwrapped
            milter_error = exc
        finally:
            milter_done.set()

    async with trio.open_nursery() as nursery:
        if run_milter is not None:
            nursery.start_soon(serve_milter, run_milter)
        nursery.start_soon(client._read)
        try:
            await client._negotiate(offer)
            yield client
            await client.close()
        except BaseException as exc:
            failure = exc
        with trio.CancelScope(shield=True):
            await stream.aclose()
        if run_milter is not None and failure is None:
            # The milter ends the connection after QUIT: on_close has run.
            with trio.move_on_after(timeout):
                await milter_done.wait()
            if not milter_done.is_set():
                failure = MilterTimeout(
                    f"the milter did not finish the connection within {timeout} s after QUIT"
                )
        nursery.cancel_scope.cancel()

    panic = state.panic if state is not None else None
    if panic is not None and (failure is None or isinstance(failure, Exception)):
        error = MilterPanic(f"a handler panicked: {panic!r}")
        if failure is not None:
            error.add_note(f"the test failed too: {failure!r}")
        raise error from panic
    if milter_error is not None and (failure is None or isinstance(failure, Exception)):
        if failure is not None:
            milter_error.add_note(f"the test failed too: {failure!r}")
        raise milter_error
    if failure is not None:
        raise failure


async def _connect(
    timeout: float,
    where: str,
    connect: Callable[..., Awaitable[trio.SocketStream]],
    *args: Any,
) -> trio.abc.Stream:
    """``await connect(*args)``, bounded by the client's step timeout."""
    try:
        with trio.fail_after(timeout):
            return await connect(*args)
    except trio.TooSlowError:
        raise MilterTimeout(f"could not connect to {where} within {timeout} s") from None
