"""Typed per-connection and per-message data, made by the milter's factories."""

from __future__ import annotations

from typing import ClassVar

import attrs
import pytest

from triomilter import (
    Actions,
    Context,
    Milter,
    MilterPanic,
    Ok,
    Result,
    SocketInfo,
    StageError,
    Status,
    on_abort,
    on_close,
    on_connect,
    on_eom,
    on_helo,
    on_mail,
    on_rcpt,
)
from triomilter.testing import open_in_memory

from ._support import OpenMilter

CONNECTIONS: list[Client] = []
MESSAGES: list[Message] = []


@attrs.define
class Client:
    hostname: str = ""
    messages: int = 0

    def __attrs_post_init__(self) -> None:
        CONNECTIONS.append(self)


@attrs.define
class Message:
    recipients: list[str] = attrs.Factory(list)
    aborted: bool = False

    def __attrs_post_init__(self) -> None:
        MESSAGES.append(self)


@on_connect
async def connect(ctx: Context[Client, Message], hostname: str, address: SocketInfo | None) -> None:
    ctx.connection_data.hostname = hostname


@on_rcpt
async def rcpt(ctx: Context[Client, Message], args: list[str]) -> Status:
    ctx.message_data.recipients.append(args[0])
    return Status.CONTINUE


@on_eom
async def eom(ctx: Context[Client, Message]) -> Result[Status]:
    client = ctx.connection_data
    client.messages += 1
    recipients = ",".join(ctx.message_data.recipients)
    await ctx.api.add_header("X-Seen", f"{client.hostname} #{client.messages}: {recipients}")
    return Ok(Status.CONTINUE)


@on_abort
async def abort(ctx: Context[Client, Message]) -> None:
    ctx.message_data.aborted = True


MILTER = Milter(
    "data",
    handlers=[connect, rcpt, eom, abort],
    actions=Actions.ADD_HEADER,
    connection_data=Client,
    message_data=Message,
)


@pytest.fixture(autouse=True)
def _fresh() -> None:
    CONNECTIONS.clear()
    MESSAGES.clear()


async def test_one_object_per_connection_and_one_per_message(open_milter: OpenMilter) -> None:
    async with open_milter(MILTER) as client:
        await client.connect("mx.example", None)
        first = await client.send_message("<a@b>", ["<c@d>", "<e@f>"])
        assert first.has_added_header("X-Seen", "mx.example #1: <c@d>,<e@f>")
        second = await client.send_message("<a@b>", ["<g@h>"])  # fresh message data
        assert second.has_added_header("X-Seen", "mx.example #2: <g@h>")  # same connection data
        await client.quit_new_connection()
        await client.connect("other.example", None)  # a new SMTP connection: fresh data
        third = await client.send_message("<a@b>", ["<i@j>"])
        assert third.has_added_header("X-Seen", "other.example #1: <i@j>")
    assert [c.hostname for c in CONNECTIONS] == ["mx.example", "other.example"]
    assert [m.recipients for m in MESSAGES] == [["<c@d>", "<e@f>"], ["<g@h>"], ["<i@j>"]]


async def test_aborted_message_data_is_seen_by_on_abort_then_dropped() -> None:
    async with open_in_memory(MILTER) as client:
        await client.connect("mx.example", None)
        await client.mail("<a@b>")
        await client.rcpt("<c@d>")
        await client.abort()
        result = await client.send_message("<a@b>", ["<e@f>"])
        assert result.has_added_header("X-Seen", "mx.example #1: <e@f>")
    assert [(m.recipients, m.aborted) for m in MESSAGES] == [(["<c@d>"], True), (["<e@f>"], False)]


async def test_message_data_outside_a_message_and_without_factories() -> None:
    seen: list[str] = []

    @on_helo
    async def helo(ctx: Context[Client, Message], hostname: str) -> Status:
        try:
            ctx.message_data  # noqa: B018 - the access is the test
        except StageError as exc:
            seen.append(str(exc))
        return Status.CONTINUE

    @on_close
    async def close(ctx: Context[None]) -> None:
        try:
            ctx.connection_data  # noqa: B018 - the access is the test
        except LookupError as exc:
            seen.append(str(exc))
        try:
            ctx.message_data  # noqa: B018 - the access is the test
        except LookupError as exc:
            seen.append(str(exc))

    async with open_in_memory(Milter("m", handlers=[helo], message_data=Message)) as client:
        await client.helo("mx")
    async with open_in_memory(Milter("m", handlers=[close])):
        pass
    assert seen[0] == "message_data is per message; on_helo is in none"
    assert "give Milter(connection_data=...) a factory" in seen[1]
    assert "give Milter(message_data=...) a factory" in seen[2]


def test_factories_must_be_callable() -> None:
    with pytest.raises(TypeError, match="connection_data must be a factory"):
        Milter("m", connection_data=Client())  # type: ignore[arg-type]


async def test_a_failing_factory_is_a_panic_not_a_crash() -> None:
    def broken() -> Client:
        raise OSError("cannot open the policy database")

    @on_helo
    async def helo(ctx: Context[Client], hostname: str) -> Status:
        return Status.CONTINUE  # pragma: no cover

    milter = Milter("broken", handlers=[helo], connection_data=broken)
    with pytest.raises(MilterPanic) as info:
        async with open_in_memory(milter) as client:
            assert (await client.helo("mx")).status is Status.TEMPFAIL
    assert isinstance(info.value.__cause__, OSError)


# --- data that needs closing ---------------------------------------------------------------


class Spool:
    """A context manager standing for a spool file: records when it is closed."""

    made: ClassVar[list[Spool]] = []

    def __init__(self) -> None:
        self.closed = 0
        Spool.made.append(self)

    def __enter__(self) -> Spool:
        return self  # pragma: no cover (the framework only exits)

    def __exit__(self, *exc: object) -> None:
        self.closed += 1


@pytest.fixture
def spools() -> list[Spool]:
    Spool.made = []
    return Spool.made


@on_mail
async def spool_mail(ctx: Context[None, Spool], args: list[str]) -> Status:
    assert ctx.message_data.closed == 0  # made
    return Status.REJECT if args[0] == "<spam@example>" else Status.CONTINUE


@on_eom
async def spool_eom(ctx: Context[None, Spool]) -> Status:
    assert ctx.message_data.closed == 0
    return Status.CONTINUE


@on_abort
async def spool_abort(ctx: Context[None, Spool]) -> None:
    assert ctx.message_data.closed == 0  # still open in on_abort


async def test_message_data_is_exited_however_the_message_ends(spools: list[Spool]) -> None:
    milter = Milter("m", handlers=[spool_mail, spool_eom, spool_abort], message_data=Spool)
    async with open_in_memory(milter) as client:
        await client.mail("<a@example>")
        await client.eom()  # end of message
        assert (await client.mail("<spam@example>")).status is Status.REJECT  # a decision
        await client.mail("<a@example>")
        await client.abort()  # an abort
        await client.mail("<a@example>")  # lost with the connection
    assert [s.closed for s in spools] == [1, 1, 1, 1]


async def test_connection_data_the_factory_made_is_exited_after_on_close(
    spools: list[Spool],
) -> None:
    seen: list[int] = []

    @on_close
    async def close(ctx: Context[Spool]) -> None:
        seen.append(ctx.connection_data.closed)

    @on_connect
    async def connect(ctx: Context[Spool], hostname: str, address: SocketInfo | None) -> None:
        pass

    milter = Milter("m", handlers=[connect, close], connection_data=Spool)
    async with open_in_memory(milter) as client:
        await client.quit_new_connection()  # a new SMTP connection, new data
        await client.connect("mx.example", None)
    assert seen == [0, 0]
    assert [s.closed for s in spools] == [1, 1]


async def test_data_set_by_hand_is_left_alone(spools: list[Spool]) -> None:
    shared = Spool()

    @on_connect
    async def connect(ctx: Context[Spool], hostname: str, address: SocketInfo | None) -> None:
        ctx.data = shared

    async with open_in_memory(Milter("m", handlers=[connect])) as client:
        await client.connect("mx.example", None)
    assert shared.closed == 0


class BadSpool(Spool):
    def __exit__(self, *exc: object) -> None:
        raise OSError("disk full")


async def test_a_failing_exit_follows_the_exception_policy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    @on_mail
    async def mail(ctx: Context[None, BadSpool], args: list[str]) -> None:
        assert ctx.message_data.closed == 0

    milter = Milter("m", handlers=[mail], message_data=BadSpool, on_exception="tempfail")
    async with open_in_memory(milter) as client:
        await client.mail("<a@example>")
        assert (await client.eom()).status is Status.CONTINUE
        await client.mail("<a@example>")
        assert (await client.eom()).status is Status.CONTINUE  # went on
    assert any(
        "closing message_data (BadSpool.__exit__) raised OSError" in r.getMessage()
        for r in caplog.records
    )
    with pytest.raises(MilterPanic):
        async with open_in_memory(Milter("m", handlers=[mail], message_data=BadSpool)) as client:
            await client.mail("<a@example>")
            await client.eom()
