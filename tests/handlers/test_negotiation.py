"""Negotiation and the `Milter` configuration (SPEC §2.2, §2.4, protocol.md §4).

Without ``on_negotiate`` the milter requests its configured actions and
``NO_*`` for every stage without a handler; with it, ALL_OPTS takes what is
offered, CONTINUE uses the returned flags, REJECT refuses the connection.
"""

from __future__ import annotations

import types
from typing import Any

import attrs
import pytest

import triomilter
from triomilter import (
    Actions,
    Context,
    MacroStage,
    Milter,
    ProtocolOpts,
    SocketInfo,
    Stage,
    Status,
    on_body,
    on_connect,
    on_eom,
    on_header,
    on_helo,
    on_negotiate,
    on_unknown,
)
from triomilter.protocol import ALL_PROTOCOL_OPTS, NO_STAGE_OPTS
from triomilter.testing import (
    POSTFIX_ACTIONS,
    AddHeader,
    MilterClosed,
    StepReply,
)

from ._support import OpenMilter

ALL_NO = (
    ProtocolOpts.NO_CONNECT
    | ProtocolOpts.NO_HELO
    | ProtocolOpts.NO_MAIL
    | ProtocolOpts.NO_RCPT
    | ProtocolOpts.NO_DATA
    | ProtocolOpts.NO_HEADER
    | ProtocolOpts.NO_EOH
    | ProtocolOpts.NO_BODY
    | ProtocolOpts.NO_UNKNOWN
)


@on_eom
async def tag(ctx: Context[None]) -> Status:
    await ctx.api.add_header("X-Tag", "yes")
    return Status.CONTINUE


async def test_a_milter_with_only_on_eom(open_milter: OpenMilter) -> None:
    milter = Milter("eom-only", handlers=[tag], actions=Actions.ADD_HEADER)
    assert milter.unhandled_steps == ALL_NO == NO_STAGE_OPTS
    async with open_milter(milter) as client:
        assert client.negotiated_opts == ALL_NO
        assert client.negotiated_actions == Actions.ADD_HEADER
        assert client.requested_macros == {}
        # The MTA sends only what somebody reads, and the message still works.
        assert await client.connect("mx", ("192.0.2.1", 25)) == StepReply(
            Status.CONTINUE, sent=False
        )
        result = await client.send_message(
            "<a@example.org>", ["<b@example.net>"], {"Subject": "hi"}, b"body\r\n"
        )
        assert (result.status, result.modifications) == (
            Status.CONTINUE,
            [AddHeader("X-Tag", "yes")],
        )


@on_helo
async def helo(ctx: Context[None], hostname: str) -> Status:
    return Status.CONTINUE


@on_header
async def header(ctx: Context[None], name: str, value: str) -> Status:
    return Status.NOREPLY


async def test_configured_protocol_opts_are_added(open_milter: OpenMilter) -> None:
    milter = Milter(
        "opts",
        handlers=[helo, header],
        protocol_opts=ProtocolOpts.NOREPLY_HEADER | ProtocolOpts.HEADER_LEADING_SPACE,
    )
    async with open_milter(milter) as client:
        assert (
            client.negotiated_opts
            == (ALL_NO & ~ProtocolOpts.NO_HELO & ~ProtocolOpts.NO_HEADER)
            | ProtocolOpts.NOREPLY_HEADER
            | ProtocolOpts.HEADER_LEADING_SPACE
        )
        assert client.negotiated_actions == Actions.NONE


def negotiating(
    status: Status, actions: Actions, opts: ProtocolOpts, seen: list[object] | None = None
) -> Milter:
    @on_negotiate
    async def negotiate(
        ctx: Context[None], offered: Actions, offered_opts: ProtocolOpts
    ) -> tuple[Status, Actions, ProtocolOpts]:
        if seen is not None:
            seen.append((offered, offered_opts))
        return status, actions, opts

    @on_body
    async def body(ctx: Context[None], chunk: bytes) -> Status:
        return Status.SKIP

    return Milter("neg", handlers=[negotiate, helo, body, tag], actions=Actions.QUARANTINE)


async def test_all_opts_takes_everything_offered(open_milter: OpenMilter) -> None:
    milter = negotiating(Status.ALL_OPTS, Actions.NONE, ProtocolOpts.NOREPLY_HELO)
    async with open_milter(milter) as client:
        # Every offered action (not the Milter's), the NO_* of unhandled stages and SKIP;
        # never NOREPLY_* (the returned flags are ignored).
        assert client.negotiated_actions == POSTFIX_ACTIONS
        assert (
            client.negotiated_opts
            == (ALL_NO & ~ProtocolOpts.NO_HELO & ~ProtocolOpts.NO_BODY) | ProtocolOpts.SKIP
        )
        assert await client.helo("mx") == StepReply(Status.CONTINUE)
        result = await client.send_message("<a@b>", "<c@d>", body=b"x" * 100_000)
        assert result.modifications == [AddHeader("X-Tag", "yes")]


async def test_all_opts_with_a_restricted_offer(open_milter: OpenMilter) -> None:
    milter = negotiating(Status.ALL_OPTS, Actions.NONE, ProtocolOpts.NONE)
    offer = ProtocolOpts.NO_HELO | ProtocolOpts.NO_BODY  # no SKIP offered
    async with open_milter(milter, actions=Actions.ADD_HEADER, opts=offer) as client:
        assert client.negotiated_actions == Actions.ADD_HEADER
        assert not client.negotiated_opts & ProtocolOpts.SKIP


async def test_continue_uses_the_returned_flags_exactly(open_milter: OpenMilter) -> None:
    opts = ProtocolOpts.NO_CONNECT | ProtocolOpts.NOREPLY_HELO | ProtocolOpts.SKIP
    seen: list[object] = []
    milter = negotiating(Status.CONTINUE, Actions.ADD_HEADER | Actions.REPLACE_BODY, opts, seen)
    async with open_milter(milter) as client:
        # No automatic NO_*: the handler chose (the Milter's actions are ignored too).
        assert client.negotiated_actions == Actions.ADD_HEADER | Actions.REPLACE_BODY
        assert client.negotiated_opts == opts
        assert await client.helo("mx") == StepReply(Status.NOREPLY)
    assert seen == [(POSTFIX_ACTIONS, ALL_PROTOCOL_OPTS)]


@pytest.mark.parametrize("status", [Status.REJECT, Status.TEMPFAIL, Status.SKIP])
async def test_other_statuses_refuse_the_connection(
    open_milter: OpenMilter, status: Status
) -> None:
    milter = negotiating(status, Actions.NONE, ProtocolOpts.NONE)
    with pytest.raises(MilterClosed):
        async with open_milter(milter):
            pass  # pragma: no cover


async def test_continue_with_actions_not_offered_refuses_the_connection(
    open_milter: OpenMilter,
) -> None:
    milter = negotiating(Status.CONTINUE, Actions.REPLACE_SENDER, ProtocolOpts.NONE)
    with pytest.raises(MilterClosed):
        async with open_milter(milter, actions=Actions.ADD_HEADER):
            pass  # pragma: no cover


async def test_configured_actions_not_offered_refuse_the_connection(
    open_milter: OpenMilter,
) -> None:
    milter = Milter("needs", handlers=[tag], actions=Actions.ADD_HEADER | Actions.QUARANTINE)
    with pytest.raises(MilterClosed):
        async with open_milter(milter, actions=Actions.ADD_HEADER):
            pass  # pragma: no cover


async def test_negotiate_may_return_a_result(open_milter: OpenMilter) -> None:
    @on_negotiate
    def negotiate(
        ctx: Context[None], actions: Actions, opts: ProtocolOpts
    ) -> triomilter.Result[tuple[Status, Actions, ProtocolOpts]]:
        return triomilter.Ok((Status.CONTINUE, Actions.QUARANTINE, ProtocolOpts.NO_HELO))

    async with open_milter(Milter("neg", handlers=[negotiate])) as client:
        assert client.negotiated_actions == Actions.QUARANTINE
        assert client.negotiated_opts == ProtocolOpts.NO_HELO


@pytest.mark.parametrize(
    "value", [None, Status.CONTINUE, (Status.CONTINUE, Actions.NONE), ("continue", 0, 0)]
)
async def test_negotiate_returning_garbage_refuses_the_connection(
    open_milter: OpenMilter, value: object
) -> None:
    @on_negotiate
    async def negotiate(
        ctx: Context[None], actions: Actions, opts: ProtocolOpts
    ) -> tuple[Status, Actions, ProtocolOpts]:
        return value  # type: ignore[return-value]

    with pytest.raises(MilterClosed):
        async with open_milter(Milter("neg", handlers=[negotiate])):
            pass  # pragma: no cover


# --- Milter configuration -------------------------------------------------------------------


@on_connect
async def connect(ctx: Context[None], hostname: str, address: SocketInfo | None) -> Status:
    return Status.CONTINUE


@on_unknown
async def unknown(ctx: Context[None], command: bytes) -> Status:
    return Status.REJECT


def test_milter_is_immutable() -> None:
    milter = Milter(
        "frozen",
        handlers=[connect, tag],
        actions=Actions.ADD_HEADER,
        macros={MacroStage.CONNECT: "j"},
    )
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        milter.name = "other"  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        milter.actions = Actions.NONE  # type: ignore[misc]
    with pytest.raises(TypeError):
        milter.handlers[Stage.HELO] = helo  # type: ignore[index]
    with pytest.raises(TypeError):
        milter.macros[MacroStage.HELO] = "x"  # type: ignore[index]
    assert dict(milter.handlers) == {Stage.CONNECT: connect, Stage.EOM: tag}
    # Changing the list given does not change the milter.
    handlers: list[triomilter.Handler[Any, object]] = [connect]
    other = Milter("copy", handlers=handlers)
    handlers.append(tag)
    assert list(other.handlers) == [Stage.CONNECT]
    # A modified copy: attrs.evolve, or another Milter's handlers.
    evolved = attrs.evolve(milter, name="evolved")
    assert (evolved.name, evolved.handlers, evolved.actions) == (
        "evolved",
        milter.handlers,
        milter.actions,
    )
    assert Milter("again", handlers=milter.handlers).handlers == milter.handlers


def test_two_handlers_for_one_stage() -> None:
    @on_eom
    async def other_eom(ctx: Context[None]) -> Status:
        return Status.CONTINUE

    with pytest.raises(ValueError, match="two handlers for stage 'eom'") as info:
        Milter("twice", handlers=[tag, connect, other_eom])
    assert "tag" in str(info.value) and "other_eom" in str(info.value)


@pytest.mark.parametrize(
    "value",
    [lambda ctx: Status.CONTINUE, "tag", None, Status.CONTINUE, tag.func],
    ids=["lambda", "str", "None", "status", "undecorated"],
)
def test_not_a_handler(value: object) -> None:
    with pytest.raises(TypeError, match="not a decorated handler"):
        Milter("bad", handlers=[tag, value])  # type: ignore[list-item]


def test_macros_need_macro_stages() -> None:
    with pytest.raises(TypeError, match="MacroStage"):
        Milter("bad", macros={2: "i"})  # type: ignore[dict-item]


def make_module() -> types.ModuleType:
    module = types.ModuleType("my_milter")
    module.connect = connect  # type: ignore[attr-defined]
    module.eom = tag  # type: ignore[attr-defined]
    module.unknown = unknown  # type: ignore[attr-defined]
    module.helper = lambda: None  # type: ignore[attr-defined]
    module.not_decorated = tag.func  # type: ignore[attr-defined]
    return module


def test_from_module_collects_handlers_and_settings() -> None:
    module = make_module()
    milter = Milter.from_module(module)
    assert milter.name == "my_milter"
    assert dict(milter.handlers) == {Stage.CONNECT: connect, Stage.EOM: tag, Stage.UNKNOWN: unknown}
    assert (milter.actions, milter.protocol_opts, dict(milter.macros)) == (
        Actions.NONE,
        ProtocolOpts.NONE,
        {},
    )
    module.MILTER_NAME = "configured"  # type: ignore[attr-defined]
    module.ACTIONS = Actions.ADD_HEADER  # type: ignore[attr-defined]
    module.PROTOCOL_OPTS = ProtocolOpts.SKIP  # type: ignore[attr-defined]
    module.MACROS = {MacroStage.MAIL: "{auth_authen}"}  # type: ignore[attr-defined]
    milter = Milter.from_module(module)
    assert (milter.name, milter.actions, milter.protocol_opts, dict(milter.macros)) == (
        "configured",
        Actions.ADD_HEADER,
        ProtocolOpts.SKIP,
        {MacroStage.MAIL: "{auth_authen}"},
    )
    # Arguments win over module settings.
    milter = Milter.from_module(module, name="given", actions=Actions.QUARANTINE, macros={})
    assert (milter.name, milter.actions, dict(milter.macros)) == ("given", Actions.QUARANTINE, {})


def test_from_module_with_two_handlers_for_a_stage() -> None:
    @on_eom
    async def other(ctx: Context[None]) -> Status:
        return Status.CONTINUE

    module = make_module()
    module.other = other  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="two handlers"):
        Milter.from_module(module)


async def test_a_module_milter_runs(open_milter: OpenMilter) -> None:
    module = make_module()
    module.ACTIONS = Actions.ADD_HEADER  # type: ignore[attr-defined]
    async with open_milter(Milter.from_module(module)) as client:
        assert (
            client.negotiated_opts == ALL_NO & ~ProtocolOpts.NO_CONNECT & ~ProtocolOpts.NO_UNKNOWN
        )
        assert (await client.connect("mx", None)).status is Status.CONTINUE
        assert (await client.unknown("FOO")).status is Status.REJECT
        assert (await client.send_message("<a@b>", "<c@d>")).has_added_header("X-Tag", "yes")


def test_milter_macros_are_checked_and_normalised() -> None:
    from triomilter import MacroStage as Stage_
    from triomilter import Milter as Milter_

    milter = Milter_("m", macros={Stage_.MAIL: "  {auth_authen}\t i "})
    assert milter.macros[Stage_.MAIL] == "{auth_authen} i"
    with pytest.raises(ValueError, match="NUL, CR or LF"):
        Milter_("m", macros={Stage_.MAIL: "i\nj"})
    with pytest.raises(TypeError, match="must be a str"):
        Milter_("m", macros={Stage_.MAIL: b"i"})  # type: ignore[dict-item]
