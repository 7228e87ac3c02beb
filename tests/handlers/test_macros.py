"""Macros and their scoping (SPEC §2.3, protocol.md §4.2, §5.1).

A ``D`` packet replaces its stage's set; CONNECT, HELO, MAIL and RCPT
forget the sets of every later stage (RCPT macros are per recipient, MAIL
macros per message); the end of a message (EOM reply, ABORT) forgets the
message's sets; QUIT_NC forgets everything. ``"x"`` and ``"{x}"`` are one
name.
"""

from __future__ import annotations

from typing import Any

import pytest

from triomilter import (
    Actions,
    Context,
    Handler,
    InvalidArgument,
    MacroStage,
    Milter,
    MilterError,
    Ok,
    ProtocolOpts,
    Result,
    SocketInfo,
    StageError,
    Status,
    on_abort,
    on_close,
    on_connect,
    on_data,
    on_eoh,
    on_eom,
    on_helo,
    on_mail,
    on_negotiate,
    on_rcpt,
    on_unknown,
)
from triomilter.testing import StepReply

from ._support import OpenMilter

NAMES = ["j", "{daemon_name}", "{tls_version}", "i", "{mail_addr}", "{rcpt_addr}", "{eoh}", "{eom}"]


def probing(seen: list[tuple[str, dict[str, str | None]]]) -> Milter:
    """Every handler records the value of every macro in `NAMES` when it runs."""

    def look(ctx: Context[None], stage: str) -> None:
        seen.append((stage, {name: ctx.api.macro_value(name) for name in NAMES}))

    @on_connect
    async def connect(ctx: Context[None], hostname: str, address: SocketInfo | None) -> Status:
        look(ctx, "connect")
        return Status.CONTINUE

    @on_helo
    async def helo(ctx: Context[None], hostname: str) -> Status:
        look(ctx, "helo")
        return Status.CONTINUE

    @on_mail
    async def mail(ctx: Context[None], args: list[str]) -> Status:
        look(ctx, "mail")
        return Status.CONTINUE

    @on_rcpt
    async def rcpt(ctx: Context[None], args: list[str]) -> Status:
        look(ctx, f"rcpt {args[0]}")
        return Status.CONTINUE

    @on_data
    async def data(ctx: Context[None]) -> Status:
        look(ctx, "data")
        return Status.CONTINUE

    @on_eoh
    async def eoh(ctx: Context[None]) -> Status:
        look(ctx, "eoh")
        return Status.CONTINUE

    @on_eom
    async def eom(ctx: Context[None]) -> Status:
        look(ctx, "eom")
        return Status.CONTINUE

    @on_abort
    async def abort(ctx: Context[None]) -> None:
        look(ctx, "abort")

    @on_close
    async def close(ctx: Context[None]) -> None:
        look(ctx, "close")

    @on_unknown
    async def unknown(ctx: Context[None], command: str) -> Status:
        look(ctx, f"unknown {command}")
        return Status.CONTINUE

    handlers: list[Handler[Any, object]] = [connect, helo, mail, rcpt, data, eoh]
    handlers += [eom, abort, close, unknown]
    return Milter("probe", handlers=handlers)


def only(**values: str) -> dict[str, str | None]:
    """A `NAMES` snapshot: these macros set, the others None."""
    result: dict[str, str | None] = dict.fromkeys(NAMES)
    for name, value in values.items():
        key = name if len(name) == 1 else "{" + name + "}"
        result[key] = value
    return result


CONNECT = {"j": "mta.example", "{daemon_name}": "smtpd"}
HELO = {"{tls_version}": "TLSv1.3"}


async def test_scoping_through_two_messages(open_milter: OpenMilter) -> None:
    seen: list[tuple[str, dict[str, str | None]]] = []
    conn = {"j": "mta.example", "daemon_name": "smtpd"}
    async with open_milter(probing(seen)) as client:
        await client.connect("mx", None, macros=CONNECT)
        await client.helo("mx", macros=HELO)
        # Message 1: MAIL, two recipients with their own macros, DATA, EOH, EOM.
        await client.mail("<a@b>", macros={"{mail_addr}": "a@b"})
        await client.rcpt("<r1@x>", macros={"{rcpt_addr}": "r1@x"})
        await client.rcpt("<r2@x>", macros={"{rcpt_addr}": "r2@x"})
        await client.rcpt("<r3@x>", macros={})  # Postfix's empty packet: no RCPT macros
        await client.data(macros={"i": "QID1"})
        await client.eoh(macros={"{eoh}": "1"})
        await client.eom(macros={"{eom}": "1"})
        await client.abort()  # outside a message: no on_abort
        # Message 2: no MAIL macros sent; message 1's are gone.
        await client.mail("<c@d>")
        await client.rcpt("<r4@x>")
        await client.abort()
        await client.unknown("AFTER-ABORT")
    tls = {"tls_version": "TLSv1.3"}
    assert seen == [
        ("connect", only(**conn)),
        ("helo", only(**conn, **tls)),
        ("mail", only(**conn, **tls, mail_addr="a@b")),
        ("rcpt <r1@x>", only(**conn, **tls, mail_addr="a@b", rcpt_addr="r1@x")),
        ("rcpt <r2@x>", only(**conn, **tls, mail_addr="a@b", rcpt_addr="r2@x")),
        ("rcpt <r3@x>", only(**conn, **tls, mail_addr="a@b")),
        ("data", only(**conn, **tls, mail_addr="a@b", i="QID1")),
        ("eoh", only(**conn, **tls, mail_addr="a@b", i="QID1", eoh="1")),
        ("eom", only(**conn, **tls, mail_addr="a@b", i="QID1", eoh="1", eom="1")),
        ("mail", only(**conn, **tls)),
        ("rcpt <r4@x>", only(**conn, **tls)),
        ("abort", only(**conn, **tls)),
        ("unknown AFTER-ABORT", only(**conn, **tls)),
        ("close", only(**conn, **tls)),  # like libmilter: close runs before macros go
    ]


async def test_abort_forgets_the_message_macros(open_milter: OpenMilter) -> None:
    seen: list[tuple[str, dict[str, str | None]]] = []
    async with open_milter(probing(seen)) as client:
        await client.connect("mx", None, macros=CONNECT)
        await client.mail("<a@b>", macros={"{mail_addr}": "a@b"})
        await client.rcpt("<r@x>", macros={"{rcpt_addr}": "r@x"})
        await client.data(macros={"i": "Q"})
        await client.abort()
        await client.helo("again")
    assert seen[-3][0] == "abort"
    assert seen[-2] == ("helo", only(j="mta.example", daemon_name="smtpd"))


async def test_abort_and_close_see_the_macros_like_libmilter(open_milter: OpenMilter) -> None:
    seen: list[tuple[str, dict[str, str | None]]] = []
    async with open_milter(probing(seen)) as client:
        await client.connect("mx", None, macros={"j": "mta.example"})
        await client.mail("<a@b>", macros={"{mail_addr}": "a@b"})
        await client.data(macros={"i": "Q"})
        await client.abort()
    assert seen[-2] == ("abort", only(j="mta.example", mail_addr="a@b", i="Q"))
    assert seen[-1] == ("close", only(j="mta.example"))


async def test_a_new_mail_forgets_the_later_stages(open_milter: OpenMilter) -> None:
    seen: list[tuple[str, dict[str, str | None]]] = []
    async with open_milter(probing(seen)) as client:
        await client.connect("mx", None)
        await client.mail("<a@b>", macros={"{mail_addr}": "a@b"})
        await client.rcpt("<r@x>", macros={"{rcpt_addr}": "r@x"})
        await client.data(macros={"i": "Q"})
        # A new MAIL inside the message: libmilter aborts the message first.
        await client.mail("<c@d>", macros={"{mail_addr}": "c@d"})
        await client.rcpt("<r2@x>")
    assert [stage for stage, _ in seen] == [
        "connect",
        "mail",
        "rcpt <r@x>",
        "data",
        "abort",
        "mail",
        "rcpt <r2@x>",
        "abort",  # QUIT inside a message: abort, then close
        "close",
    ]
    assert seen[5] == ("mail", only(mail_addr="c@d"))
    assert seen[6] == ("rcpt <r2@x>", only(mail_addr="c@d"))


async def test_quit_new_connection_forgets_everything(open_milter: OpenMilter) -> None:
    seen: list[tuple[str, dict[str, str | None]]] = []
    async with open_milter(probing(seen)) as client:
        await client.connect("mx", None, macros=CONNECT)
        await client.helo("mx", macros=HELO)
        await client.quit_new_connection()
        await client.connect("mx2", None)
        await client.helo("mx2")
    assert seen == [
        ("connect", only(j="mta.example", daemon_name="smtpd")),
        ("helo", only(j="mta.example", daemon_name="smtpd", tls_version="TLSv1.3")),
        # on_close still reads the macros (libmilter's order); then they are gone.
        ("close", only(j="mta.example", daemon_name="smtpd", tls_version="TLSv1.3")),
        ("connect", only()),
        ("helo", only()),
        ("close", only()),
    ]


async def test_connect_macros_persist_across_messages(open_milter: OpenMilter) -> None:
    seen: list[tuple[str, dict[str, str | None]]] = []
    async with open_milter(probing(seen)) as client:
        await client.connect("mx", None, macros={"j": "mta.example"})
        for _ in range(3):
            await client.send_message("<a@b>", "<c@d>")
            await client.abort()
    eoms = [values for stage, values in seen if stage == "eom"]
    assert eoms == [only(j="mta.example")] * 3


async def test_a_later_packet_replaces_the_stage_set(open_milter: OpenMilter) -> None:
    seen: list[tuple[str, dict[str, str | None]]] = []
    async with open_milter(probing(seen)) as client:
        await client.macros(MacroStage.CONNECT, {"j": "old", "{daemon_name}": "d"})
        await client.connect("mx", None, macros={"j": "new"})
    assert seen[0] == ("connect", only(j="new"))


# --- names and values ----------------------------------------------------------------------


async def test_names_with_and_without_braces(open_milter: OpenMilter) -> None:
    values: list[object] = []

    @on_connect
    async def connect(ctx: Context[None], hostname: str, address: SocketInfo | None) -> Status:
        api = ctx.api
        values.extend(
            [
                api.macro_value("i"),
                api.macro_value("{i}"),
                api.macro_value(b"{i}"),
                api.macro_bytes("i"),
                api.macro_value("{client_addr}"),
                api.macro_value("client_addr"),
                api.macro_bytes(b"client_addr"),
                api.macro_value("missing"),
                api.macro_bytes("{missing}"),
                api.macro_value("caf\xe9"),  # not ASCII: no macro has that name
            ]
        )
        return Status.CONTINUE

    async with open_milter(Milter("names", handlers=[connect])) as client:
        # Sent with braces for "i" and without for the long name: lookups don't care.
        await client.connect("mx", None, macros={"{i}": "Q1", "client_addr": "192.0.2.1"})
    assert values == [
        "Q1",
        "Q1",
        "Q1",
        b"Q1",
        "192.0.2.1",
        "192.0.2.1",
        b"192.0.2.1",
        None,
        None,
        None,
    ]


async def test_non_utf8_macro_values(open_milter: OpenMilter) -> None:
    """A client's reverse DNS name can be any bytes: macro_value never fails on them."""
    results: list[object] = []

    @on_mail
    async def mail(ctx: Context[None], args: list[str]) -> Status:
        results.append(ctx.api.macro_bytes("{auth_authen}"))
        results.append(ctx.api.macro_value("{auth_authen}"))
        return Status.CONTINUE

    async with open_milter(Milter("raw", handlers=[mail])) as client:
        assert await client.mail("<a@b>", macros={"{auth_authen}": b"j\xf6rg"}) == StepReply(
            Status.CONTINUE
        )
    assert results == [b"j\xf6rg", "j\ufffdrg"]


# --- requesting macros -------------------------------------------------------------------


async def test_request_macros_in_on_negotiate(open_milter: OpenMilter) -> None:
    @on_negotiate
    async def negotiate(
        ctx: Context[None], actions: Actions, opts: ProtocolOpts
    ) -> tuple[Status, Actions, ProtocolOpts]:
        ctx.api.request_macros(MacroStage.MAIL, "{auth_authen}  {auth_type}")
        ctx.api.request_macros(MacroStage.EOH, "i")
        ctx.api.request_macros(MacroStage.RCPT, "old")
        ctx.api.request_macros(MacroStage.RCPT, "{rcpt_addr}")  # replaces the list
        return Status.CONTINUE, Actions.ADD_HEADER, ProtocolOpts.NONE

    async with open_milter(Milter("neg", handlers=[negotiate])) as client:
        assert client.requested_macros == {
            MacroStage.MAIL: ["{auth_authen}", "{auth_type}"],
            MacroStage.RCPT: ["{rcpt_addr}"],
            MacroStage.EOH: ["i"],
        }
        # libmilter's API rule: macro lists come with SETSYMLIST.
        assert client.negotiated_actions == Actions.ADD_HEADER | Actions.REQUEST_MACROS


async def test_request_macros_with_all_opts(open_milter: OpenMilter) -> None:
    @on_negotiate
    def negotiate(
        ctx: Context[None], actions: Actions, opts: ProtocolOpts
    ) -> tuple[Status, Actions, ProtocolOpts]:
        ctx.api.request_macros(MacroStage.CONNECT, "j _")
        return Status.ALL_OPTS, Actions.NONE, ProtocolOpts.NONE

    async with open_milter(Milter("neg", handlers=[negotiate])) as client:
        assert client.requested_macros == {MacroStage.CONNECT: ["j", "_"]}


async def test_request_macros_errors_in_on_negotiate(open_milter: OpenMilter) -> None:
    raised: list[BaseException] = []

    @on_negotiate
    async def negotiate(
        ctx: Context[None], actions: Actions, opts: ProtocolOpts
    ) -> tuple[Status, Actions, ProtocolOpts]:
        for stage, names in [(2, "i"), (MacroStage.MAIL, "a\0b"), (MacroStage.MAIL, "a\nb")]:
            try:
                ctx.api.request_macros(stage, names)  # type: ignore[arg-type]
            except MilterError as exc:
                raised.append(exc)
        return Status.CONTINUE, Actions.NONE, ProtocolOpts.NONE

    async with open_milter(Milter("neg", handlers=[negotiate])) as client:
        assert client.requested_macros == {}
    assert [type(exc) for exc in raised] == [InvalidArgument] * 3


async def test_request_macros_outside_on_negotiate_is_a_stage_error(
    open_milter: OpenMilter,
) -> None:
    raised: list[BaseException] = []

    @on_connect
    async def connect(ctx: Context[None], hostname: str, address: SocketInfo | None) -> Status:
        try:
            ctx.api.request_macros(MacroStage.MAIL, "i")
        except MilterError as exc:
            raised.append(exc)
        return Status.CONTINUE

    @on_helo
    async def helo(ctx: Context[None], hostname: str) -> Result[Status]:
        ctx.api.request_macros(MacroStage.MAIL, "i")  # StageError -> Err -> TEMPFAIL
        return Ok(Status.CONTINUE)  # pragma: no cover

    async with open_milter(Milter("late", handlers=[connect, helo])) as client:
        assert (await client.connect("mx", None)).status is Status.CONTINUE
        assert (await client.helo("mx")).status is Status.TEMPFAIL
    (exc,) = raised
    assert type(exc) is StageError
    assert "on_negotiate" in str(exc)


@pytest.mark.parametrize("with_handlers", [False, True])
async def test_milter_macros_setting(open_milter: OpenMilter, with_handlers: bool) -> None:
    @on_eom
    async def eom(ctx: Context[None]) -> Status:
        return Status.CONTINUE

    milter = Milter(
        "macros",
        handlers=[eom] if with_handlers else [],
        macros={MacroStage.CONNECT: "j {daemon_name}", MacroStage.EOM: "{msg_id}"},
    )
    async with open_milter(milter) as client:
        assert client.requested_macros == {
            MacroStage.CONNECT: ["j", "{daemon_name}"],
            MacroStage.EOM: ["{msg_id}"],
            MacroStage.EOH: [],  # added for Sendmail, which honours an EOM list only with one
        }
        assert client.negotiated_actions & Actions.REQUEST_MACROS
