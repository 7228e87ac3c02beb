"""Per-connection data, on_close/on_abort, and background work (SPEC §2.1, §2.3).

- ``ctx.data`` survives the messages of a connection and is dropped after
  ``on_close`` (QUIT or QUIT_NC);
- ``on_close`` runs exactly once per connection, even as the only handler;
- ``on_abort`` runs for an abort inside a message only;
- ``ctx.connection_nursery`` runs background work that a later stage can
  await; it is cancelled when the connection ends, and an exception in it
  is a panic.
"""

from __future__ import annotations

import contextlib

import attrs
import pytest
import trio

from triomilter import (
    Actions,
    ConnectionLost,
    ConnectionTasks,
    Context,
    Err,
    Milter,
    MilterPanic,
    Ok,
    Result,
    SocketInfo,
    Status,
    on_abort,
    on_close,
    on_connect,
    on_eom,
    on_helo,
    on_mail,
)
from triomilter.protocol import NO_STAGE_OPTS
from triomilter.testing import AddHeader, MilterClosed, StepReply, open_in_memory

from ._support import OpenMilter


@attrs.define
class Conn:
    name: str
    messages: int = 0


def counting(events: list[object]) -> Milter:
    @on_connect
    async def connect(ctx: Context[Conn], hostname: str, address: SocketInfo | None) -> Status:
        events.append(("connect", hostname, ctx.data))
        ctx.data = Conn(hostname)
        return Status.CONTINUE

    @on_mail
    async def mail(ctx: Context[Conn], args: list[str]) -> Status:
        return Status.CONTINUE

    @on_eom
    async def eom(ctx: Context[Conn]) -> Status:
        assert ctx.data is not None
        ctx.data.messages += 1
        await ctx.api.add_header("X-Message", f"{ctx.data.name} #{ctx.data.messages}")
        return Status.CONTINUE

    @on_abort
    async def abort(ctx: Context[Conn]) -> None:
        events.append(("abort", ctx.data.messages if ctx.data else None))

    @on_close
    async def close(ctx: Context[Conn]) -> None:
        events.append(("close", ctx.data))

    return Milter("count", handlers=[connect, mail, eom, abort, close], actions=Actions.ADD_HEADER)


async def test_data_across_messages_and_connections(open_milter: OpenMilter) -> None:
    events: list[object] = []
    async with open_milter(counting(events)) as client:
        await client.connect("one", None)
        for n in (1, 2):
            result = await client.send_message("<a@b>", "<c@d>")
            assert result.modifications == [AddHeader("X-Message", f"one #{n}")]
            await client.abort()  # outside a message (Postfix's habit): no on_abort
        await client.quit_new_connection()
        await client.connect("two", None)
        result = await client.send_message("<a@b>", "<c@d>")
        assert result.modifications == [AddHeader("X-Message", "two #1")]
        await client.mail("<a@b>")
        await client.abort()  # inside a message: on_abort
        await client.abort()  # repeated: ignored
    assert events == [
        ("connect", "one", None),
        ("close", Conn("one", 2)),
        ("connect", "two", None),  # dropped after on_close
        ("abort", 1),
        ("close", Conn("two", 1)),
    ]


async def test_close_runs_once_even_as_the_only_handler(open_milter: OpenMilter) -> None:
    closes: list[str] = []

    @on_close
    def close(ctx: Context[None]) -> None:
        closes.append(ctx.stage.value)

    async with open_milter(Milter("close-only", handlers=[close])) as client:
        assert client.negotiated_opts & NO_STAGE_OPTS == NO_STAGE_OPTS
        assert await client.connect("mx", None) == StepReply(Status.CONTINUE, sent=False)
        result = await client.send_message("<a@b>", "<c@d>", {"Subject": "x"}, b"body\r\n")
        assert result.status is Status.CONTINUE
        await client.abort()
        assert closes == []
    assert closes == ["close"]


async def test_close_runs_once_per_connection(open_milter: OpenMilter) -> None:
    closes: list[str | None] = []

    @on_connect
    async def connect(ctx: Context[str], hostname: str, address: SocketInfo | None) -> Status:
        ctx.data = hostname
        return Status.CONTINUE

    @on_close
    async def close(ctx: Context[str]) -> None:
        closes.append(ctx.data)

    async with open_milter(Milter("close", handlers=[connect, close])) as client:
        for name in ("a", "b", "c"):
            await client.connect(name, None)
            await client.quit_new_connection()
        await client.connect("d", None)
    assert closes == ["a", "b", "c", "d"]


@pytest.mark.parametrize("when", ["between", "in-message"])
async def test_close_when_the_connection_is_rejected(open_milter: OpenMilter, when: str) -> None:
    events: list[str] = []

    @on_helo
    async def helo(ctx: Context[None], hostname: str) -> Status:
        events.append("helo")
        return Status.REJECT

    @on_mail
    async def mail(ctx: Context[None], args: list[str]) -> Status:
        events.append("mail")
        return Status.CONTINUE

    @on_abort
    async def abort(ctx: Context[None]) -> None:
        events.append("abort")

    @on_close
    async def close(ctx: Context[None]) -> None:
        events.append("close")

    async with open_milter(Milter("rej", handlers=[helo, mail, abort, close])) as client:
        if when == "in-message":
            await client.mail("<a@b>")
        assert (await client.helo("x")).status is Status.REJECT
    # HELO inside a message aborts it first (libmilter).
    expected = ["helo", "close"] if when == "between" else ["mail", "abort", "helo", "close"]
    assert events == expected


async def test_quit_inside_a_message_aborts_then_closes(open_milter: OpenMilter) -> None:
    events: list[str] = []

    @on_mail
    async def mail(ctx: Context[None], args: list[str]) -> Status:
        events.append("mail")
        return Status.CONTINUE

    @on_abort
    async def abort(ctx: Context[None]) -> None:
        events.append("abort")

    @on_close
    async def close(ctx: Context[None]) -> None:
        events.append("close")

    async with open_milter(Milter("quit", handlers=[mail, abort, close])) as client:
        await client.mail("<a@b>")
    assert events == ["mail", "abort", "close"]


async def test_abort_after_a_decided_message_is_not_called(open_milter: OpenMilter) -> None:
    events: list[str] = []

    @on_mail
    async def mail(ctx: Context[None], args: list[str]) -> Status:
        events.append("mail")
        return Status.REJECT

    @on_abort
    async def abort(ctx: Context[None]) -> None:
        events.append("abort")

    async with open_milter(Milter("decided", handlers=[mail, abort])) as client:
        assert (await client.mail("<a@b>")).status is Status.REJECT
        await client.abort()
    assert events == ["mail"]


async def test_an_error_reply_set_in_on_abort_is_forgotten(open_milter: OpenMilter) -> None:
    @on_mail
    async def mail(ctx: Context[None], args: list[str]) -> Status:
        return Status.REJECT if args[0] == "<reject@b>" else Status.CONTINUE

    @on_abort
    async def abort(ctx: Context[None]) -> None:
        ctx.api.set_error_reply("550", "5.7.1", "set in on_abort")

    async with open_milter(Milter("abort", handlers=[mail, abort])) as client:
        await client.mail("<a@b>")
        await client.abort()
        # The abort handler's reply is not used by the next handler.
        assert await client.mail("<reject@b>") == StepReply(Status.REJECT)


# --- background work -------------------------------------------------------------------------


@attrs.define
class Lookup:
    address: str
    result: str | None = None
    done: trio.Event = attrs.field(factory=trio.Event)
    cancelled: bool = False


def looking_up(lookups: list[Lookup], release: trio.Event) -> Milter:
    async def lookup(item: Lookup) -> None:
        try:
            await release.wait()
            item.result = f"looked up {item.address}"
            item.done.set()
            await trio.sleep_forever()  # still running when the connection ends
        except trio.Cancelled:
            item.cancelled = True
            raise

    @on_connect
    async def connect(ctx: Context[Lookup], hostname: str, address: SocketInfo | None) -> Status:
        ctx.data = Lookup(address.address if address else "?")
        lookups.append(ctx.data)
        ctx.connection_nursery.start_soon(lookup, ctx.data)
        return Status.CONTINUE

    @on_mail
    async def mail(ctx: Context[Lookup], args: list[str]) -> Status:
        release.set()  # the "network" answers while the message goes on
        return Status.CONTINUE

    @on_eom
    async def eom(ctx: Context[Lookup]) -> Status:
        assert ctx.data is not None
        await ctx.data.done.wait()
        await ctx.api.add_header("X-Lookup", ctx.data.result or "none")
        return Status.CONTINUE

    return Milter("lookup", handlers=[connect, mail, eom], actions=Actions.ADD_HEADER)


async def test_background_work_started_at_connect_awaited_at_eom(
    open_milter: OpenMilter,
) -> None:
    lookups: list[Lookup] = []
    async with open_milter(looking_up(lookups, trio.Event())) as client:
        await client.connect("mx", ("192.0.2.7", 25))
        assert lookups[0].result is None
        result = await client.send_message("<a@b>", "<c@d>")
        assert result.modifications == [AddHeader("X-Lookup", "looked up 192.0.2.7")]
        assert not lookups[0].cancelled
    # The connection ended: its background work was cancelled.
    assert lookups[0].cancelled


async def test_connection_nursery_is_per_connection(open_milter: OpenMilter) -> None:
    nurseries: list[ConnectionTasks] = []

    @on_helo
    async def helo(ctx: Context[None], hostname: str) -> Status:
        nurseries.append(ctx.connection_nursery)
        return Status.CONTINUE

    milter = Milter("n", handlers=[helo])
    async with open_milter(milter) as a, open_milter(milter) as b:
        await a.helo("a")
        await b.helo("b")
        await a.helo("a")
    assert nurseries[0] is nurseries[2]
    assert nurseries[0] is not nurseries[1]


async def test_an_exception_in_background_work_is_a_panic() -> None:
    error = RuntimeError("lookup failed badly")
    calls: list[str] = []

    async def failing() -> None:
        await trio.lowlevel.checkpoint()
        raise error

    @on_connect
    async def connect(ctx: Context[None], hostname: str, address: SocketInfo | None) -> Status:
        ctx.connection_nursery.start_soon(failing)
        return Status.CONTINUE

    @on_helo
    async def helo(ctx: Context[None], hostname: str) -> Status:
        calls.append("helo")  # pragma: no cover
        return Status.CONTINUE  # pragma: no cover

    @on_close
    async def close(ctx: Context[None]) -> None:
        calls.append("close")  # pragma: no cover

    with pytest.raises(MilterPanic) as info:
        async with open_in_memory(Milter("bg", handlers=[connect, helo, close])) as client:
            assert (await client.connect("mx", None)).status is Status.CONTINUE
            # The connection still answers, TEMPFAIL, and no handler runs.
            assert await client.helo("mx") == StepReply(Status.TEMPFAIL)
    assert info.value.__cause__ is error
    assert calls == []


async def test_an_exception_in_background_work_is_a_panic_in_both_modes(
    open_milter: OpenMilter,
) -> None:
    error = KeyError("bg")
    started = trio.Event()

    async def failing() -> None:
        await started.wait()
        raise error

    @on_connect
    async def connect(ctx: Context[None], hostname: str, address: SocketInfo | None) -> Status:
        ctx.connection_nursery.start_soon(failing)
        return Status.CONTINUE

    @on_helo
    async def helo(ctx: Context[None], hostname: str) -> Status:
        started.set()
        return Status.CONTINUE

    with pytest.raises(MilterPanic) as info:
        async with open_milter(Milter("bg", handlers=[connect, helo])) as client:
            await client.connect("mx", None)
            await client.helo("mx")
            # TEMPFAIL in memory; over TCP serve() may have closed it already.
            with contextlib.suppress(MilterClosed):
                assert (await client.helo("again")).status is Status.TEMPFAIL
    assert info.value.__cause__ is error


# --- ctx.connection_nursery.start keeps trio's contract ---------------------------------


async def test_start_hands_an_early_error_to_the_caller(
    open_milter: OpenMilter, caplog: pytest.LogCaptureFixture
) -> None:
    """Before ``started()`` an error is the caller's, as itself, and no panic."""
    error = LookupError("no such zone")
    seen: list[BaseException] = []

    async def lookup(task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        await trio.lowlevel.checkpoint()
        raise error

    @on_mail
    async def mail(ctx: Context[None], args: list[str]) -> Result[Status]:
        try:
            await ctx.connection_nursery.start(lookup)
        except LookupError as exc:
            seen.append(exc)
            return Err(exc)
        return Ok(Status.CONTINUE)  # pragma: no cover

    async with open_milter(Milter("start", handlers=[mail])) as client:
        assert await client.mail("<a@b>") == StepReply(Status.TEMPFAIL)
        assert await client.mail("<a@b>") == StepReply(Status.TEMPFAIL)  # no panic: it goes on
    assert seen == [error, error]
    assert not [r for r in caplog.records if "panicked" in r.getMessage()]


async def test_start_returns_the_started_value_and_later_errors_are_one_panic(
    caplog: pytest.LogCaptureFixture,
) -> None:
    error = RuntimeError("after started")
    go_on = trio.Event()

    async def lookup(task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started("ready")
        await go_on.wait()
        raise error

    @on_connect
    async def connect(ctx: Context[str], hostname: str, address: SocketInfo | None) -> Status:
        ctx.data = await ctx.connection_nursery.start(lookup)
        return Status.CONTINUE

    @on_helo
    async def helo(ctx: Context[str], hostname: str) -> Status:
        assert ctx.data == "ready"
        go_on.set()
        return Status.CONTINUE

    with pytest.raises(MilterPanic) as info:
        async with open_in_memory(Milter("start", handlers=[connect, helo])) as client:
            await client.connect("mx", None)
            await client.helo("mx")
    assert info.value.__cause__ is error
    panics = [r for r in caplog.records if "panicked" in r.getMessage()]
    assert len(panics) == 1, [r.getMessage() for r in panics]


async def test_connection_lost_in_background_work_is_no_panic() -> None:
    """``ConnectionLost`` ends the connection; it is not a panic, started or not."""

    async def writer(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        raise ConnectionLost("the MTA is gone")

    async def plain() -> None:
        raise ConnectionLost("the MTA is gone")

    @on_connect
    async def connect(ctx: Context[None], hostname: str, address: SocketInfo | None) -> Status:
        await ctx.connection_nursery.start(writer)
        ctx.connection_nursery.start_soon(plain)
        return Status.CONTINUE

    async with open_in_memory(Milter("lost", handlers=[connect])) as client:
        assert (await client.connect("mx", None)).status is Status.CONTINUE
        assert (await client.helo("mx")).status is Status.CONTINUE
