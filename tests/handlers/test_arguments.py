"""Handler arguments arrive with the annotated types, at every stage (SPEC §2.1).

``str`` parameters get UTF-8 text, ``bytes`` parameters the raw bytes (per
parameter, also inside ``list[...]``); a ``str`` parameter whose data is not
UTF-8 makes the stage answer TEMPFAIL without calling the handler. Handlers
may be ``async def`` or plain ``def``.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from triomilter import (
    Actions,
    Context,
    Handler,
    Milter,
    ProtocolOpts,
    SocketFamily,
    SocketInfo,
    Status,
    on_abort,
    on_body,
    on_close,
    on_connect,
    on_data,
    on_eoh,
    on_eom,
    on_header,
    on_helo,
    on_mail,
    on_negotiate,
    on_rcpt,
    on_unknown,
)
from triomilter.protocol import NO_STAGE_OPTS, NOREPLY_OPTS
from triomilter.testing import POSTFIX_ACTIONS, POSTFIX_OPTS, MilterClient, StepReply

from ._support import OpenMilter

Seen = list[tuple[object, ...]]


def text_milter(seen: Seen) -> Milter:
    """Every stage, every string parameter annotated ``str``; async handlers."""

    @on_negotiate
    async def negotiate(
        ctx: Context[None], actions: Actions, opts: ProtocolOpts
    ) -> tuple[Status, Actions, ProtocolOpts]:
        seen.append(("negotiate", actions, opts))
        return Status.ALL_OPTS, actions, opts

    @on_connect
    async def connect(ctx: Context[None], hostname: str, address: SocketInfo | None) -> Status:
        seen.append(("connect", hostname, address))
        return Status.CONTINUE

    @on_helo
    async def helo(ctx: Context[None], hostname: str) -> Status:
        seen.append(("helo", hostname))
        return Status.CONTINUE

    @on_mail
    async def mail(ctx: Context[None], args: list[str]) -> Status:
        seen.append(("mail", args))
        return Status.CONTINUE

    @on_rcpt
    async def rcpt(ctx: Context[None], args: list[str]) -> Status:
        seen.append(("rcpt", args))
        return Status.CONTINUE

    @on_data
    async def data(ctx: Context[None]) -> Status:
        seen.append(("data",))
        return Status.CONTINUE

    @on_header
    async def header(ctx: Context[None], name: str, value: str) -> Status:
        seen.append(("header", name, value))
        return Status.CONTINUE

    @on_eoh
    async def eoh(ctx: Context[None]) -> Status:
        seen.append(("eoh",))
        return Status.CONTINUE

    @on_body
    async def body(ctx: Context[None], chunk: bytes) -> Status:
        seen.append(("body", chunk))
        return Status.CONTINUE

    @on_eom
    async def eom(ctx: Context[None]) -> Status:
        seen.append(("eom",))
        return Status.CONTINUE

    @on_abort
    async def abort(ctx: Context[None]) -> None:
        seen.append(("abort",))

    @on_close
    async def close(ctx: Context[None]) -> Status:
        seen.append(("close",))
        return Status.CONTINUE

    @on_unknown
    async def unknown(ctx: Context[None], command: str) -> Status:
        seen.append(("unknown", command))
        return Status.CONTINUE

    handlers: list[Handler[Any, object]] = [negotiate, connect, helo, mail, rcpt, data, header]
    handlers += [eoh, body, eom, abort, close, unknown]
    return Milter("text", handlers=handlers)


def bytes_milter(seen: Seen) -> Milter:
    """Every stage, every string parameter annotated ``bytes``; plain ``def`` handlers."""

    @on_negotiate
    def negotiate(
        ctx: Context[None], actions: Actions, opts: ProtocolOpts
    ) -> tuple[Status, Actions, ProtocolOpts]:
        seen.append(("negotiate", actions, opts))
        return Status.ALL_OPTS, actions, opts

    @on_connect
    def connect(ctx: Context[None], hostname: bytes, address: SocketInfo | None) -> Status:
        seen.append(("connect", hostname, address))
        return Status.CONTINUE

    @on_helo
    def helo(ctx: Context[None], hostname: bytes) -> Status:
        seen.append(("helo", hostname))
        return Status.CONTINUE

    @on_mail
    def mail(ctx: Context[None], args: list[bytes]) -> Status:
        seen.append(("mail", args))
        return Status.CONTINUE

    @on_rcpt
    def rcpt(ctx: Context[None], args: list[bytes]) -> Status:
        seen.append(("rcpt", args))
        return Status.CONTINUE

    @on_data
    def data(ctx: Context[None]) -> Status:
        seen.append(("data",))
        return Status.CONTINUE

    @on_header
    def header(ctx: Context[None], name: bytes, value: bytes) -> Status:
        seen.append(("header", name, value))
        return Status.CONTINUE

    @on_eoh
    def eoh(ctx: Context[None]) -> Status:
        seen.append(("eoh",))
        return Status.CONTINUE

    @on_body
    def body(ctx: Context[None], chunk: bytes) -> Status:
        seen.append(("body", chunk))
        return Status.CONTINUE

    @on_eom
    def eom(ctx: Context[None]) -> Status:
        seen.append(("eom",))
        return Status.CONTINUE

    @on_abort
    def abort(ctx: Context[None]) -> Status:
        seen.append(("abort",))
        return Status.CONTINUE

    @on_close
    def close(ctx: Context[None]) -> None:
        seen.append(("close",))

    @on_unknown
    def unknown(ctx: Context[None], command: bytes) -> Status:
        seen.append(("unknown", command))
        return Status.CONTINUE

    handlers: list[Handler[Any, object]] = [negotiate, connect, helo, mail, rcpt, data, header]
    handlers += [eoh, body, eom, abort, close, unknown]
    return Milter("raw", handlers=handlers)


async def whole_session(client: MilterClient) -> None:
    """Every stage once (the abort inside a second message), all answered CONTINUE."""
    cont = StepReply(Status.CONTINUE)
    assert await client.connect("mx.example", ("192.0.2.1", 4567)) == cont
    assert await client.helo("helo.example") == cont
    assert await client.mail("<a@example.org>", "SIZE=10", "BODY=8BITMIME") == cont
    assert await client.rcpt("<b@example.net>", "NOTIFY=NEVER") == cont
    assert await client.data() == cont
    assert await client.header("Subject", "caf\xe9") == cont
    assert await client.header("X-Folded", "one\n\ttwo") == cont
    assert await client.eoh() == cont
    assert await client.body(b"line\r\n\0binary\xff\r\n") == cont
    eom = await client.eom()
    assert (eom.status, eom.modifications) == (Status.CONTINUE, [])
    assert await client.unknown("XYZZY h\xe9") == cont
    assert await client.mail("<>") == cont
    await client.abort()
    await client.close()


async def test_str_parameters_get_text(open_milter: OpenMilter) -> None:
    seen: Seen = []
    async with open_milter(text_milter(seen)) as client:
        assert client.negotiated_actions == POSTFIX_ACTIONS
        await whole_session(client)
    assert seen == [
        ("negotiate", POSTFIX_ACTIONS, POSTFIX_OPTS),
        ("connect", "mx.example", SocketInfo(SocketFamily.INET, "192.0.2.1", 4567)),
        ("helo", "helo.example"),
        ("mail", ["<a@example.org>", "SIZE=10", "BODY=8BITMIME"]),
        ("rcpt", ["<b@example.net>", "NOTIFY=NEVER"]),
        ("data",),
        ("header", "Subject", "caf\xe9"),
        ("header", "X-Folded", "one\n\ttwo"),
        ("eoh",),
        ("body", b"line\r\n\0binary\xff\r\n"),
        ("eom",),
        ("unknown", "XYZZY h\xe9"),
        ("mail", ["<>"]),
        ("abort",),
        ("close",),
    ]
    for event in seen[1:]:
        for arg in event[1:]:
            if isinstance(arg, list):
                assert all(type(item) is str for item in arg)
            elif event[0] != "body" and not isinstance(arg, SocketInfo):
                assert type(arg) is str


async def test_bytes_parameters_get_raw_bytes(open_milter: OpenMilter) -> None:
    seen: Seen = []
    async with open_milter(bytes_milter(seen)) as client:
        await whole_session(client)
    assert seen == [
        ("negotiate", POSTFIX_ACTIONS, POSTFIX_OPTS),
        ("connect", b"mx.example", SocketInfo(SocketFamily.INET, "192.0.2.1", 4567)),
        ("helo", b"helo.example"),
        ("mail", [b"<a@example.org>", b"SIZE=10", b"BODY=8BITMIME"]),
        ("rcpt", [b"<b@example.net>", b"NOTIFY=NEVER"]),
        ("data",),
        ("header", b"Subject", "caf\xe9".encode()),
        ("header", b"X-Folded", b"one\n\ttwo"),
        ("eoh",),
        ("body", b"line\r\n\0binary\xff\r\n"),
        ("eom",),
        ("unknown", "XYZZY h\xe9".encode()),
        ("mail", [b"<>"]),
        ("abort",),
        ("close",),
    ]


async def test_negotiate_gets_the_offer_as_flags(open_milter: OpenMilter) -> None:
    seen: Seen = []
    offer = ProtocolOpts.SKIP | ProtocolOpts.NO_HELO
    async with open_milter(text_milter(seen), actions=Actions.ADD_HEADER, opts=offer) as client:
        # ALL_OPTS: every offered action, SKIP if offered, no NOREPLY_*.
        assert client.negotiated_actions == Actions.ADD_HEADER
        assert client.negotiated_opts == ProtocolOpts.SKIP
    (event,) = (e for e in seen if e[0] == "negotiate")
    _, actions, opts = event
    assert type(actions) is Actions and type(opts) is ProtocolOpts
    assert actions == Actions.ADD_HEADER
    # libmilter shows the NOREPLY_* steps it can fake as offered.
    assert opts == offer | NOREPLY_OPTS


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        (("192.0.2.1", 25), SocketInfo(SocketFamily.INET, "192.0.2.1", 25)),
        (("2001:db8::1", 2525), SocketInfo(SocketFamily.INET6, "2001:db8::1", 2525)),
        # Sendmail's "IPv6:" prefix and an uncompressed address are normalised.
        (("IPv6:2001:DB8:0:0:0:0:0:1", 587), SocketInfo(SocketFamily.INET6, "2001:db8::1", 587)),
        (("[2001:db8::2]", 1), SocketInfo(SocketFamily.INET6, "2001:db8::2", 1)),
        ("/run/smtpd.sock", SocketInfo(SocketFamily.UNIX, "/run/smtpd.sock", 0)),
        (None, None),
    ],
    ids=["inet", "inet6", "ipv6-prefix", "ipv6-brackets", "unix", "unknown"],
)
async def test_connect_address(open_milter: OpenMilter, address: object, expected: object) -> None:
    seen: Seen = []
    async with open_milter(text_milter(seen)) as client:
        assert (await client.connect("[192.0.2.1]", address)).status is Status.CONTINUE  # type: ignore[arg-type]
    assert ("connect", "[192.0.2.1]", expected) in seen


async def test_every_family_on_one_socket_with_quit_new_connection(
    open_milter: OpenMilter,
) -> None:
    seen: Seen = []
    addresses = [("192.0.2.1", 25), ("IPv6:::1", 26), "/tmp/s", None]
    async with open_milter(bytes_milter(seen)) as client:
        for address in addresses:
            await client.connect(b"h\xff", address)
            await client.quit_new_connection()
    assert [e for e in seen if e[0] == "connect"] == [
        ("connect", b"h\xff", SocketInfo(SocketFamily.INET, "192.0.2.1", 25)),
        ("connect", b"h\xff", SocketInfo(SocketFamily.INET6, "::1", 26)),
        ("connect", b"h\xff", SocketInfo(SocketFamily.UNIX, "/tmp/s", 0)),
        ("connect", b"h\xff", None),
    ]
    assert [e[0] for e in seen].count("close") == 4


def mixed_milter(seen: Seen) -> Milter:
    """``str`` and ``bytes`` chosen per parameter."""

    @on_header
    async def header(ctx: Context[None], name: str, value: bytes) -> Status:
        seen.append(("header", name, value))
        return Status.CONTINUE

    @on_eom
    def eom(ctx: Context[None]) -> Status:
        seen.append(("eom",))
        return Status.CONTINUE

    return Milter("mixed", handlers=[header, eom])


async def test_non_utf8_header_value_with_a_bytes_parameter(open_milter: OpenMilter) -> None:
    seen: Seen = []
    async with open_milter(mixed_milter(seen)) as client:
        assert client.negotiated_opts & NO_STAGE_OPTS == NO_STAGE_OPTS & ~ProtocolOpts.NO_HEADER
        await client.mail("<a@b>")
        assert (await client.header("X-Raw", b"\xff\xfe 8-bit")).status is Status.CONTINUE
        assert (await client.eom()).status is Status.CONTINUE
    assert seen == [("header", "X-Raw", b"\xff\xfe 8-bit"), ("eom",)]


def str_milter_for(stage: str, seen: Seen) -> Milter:
    """A milter whose only handler is ``stage``'s, with ``str`` parameters."""

    @on_connect
    async def connect(ctx: Context[None], hostname: str, address: SocketInfo | None) -> Status:
        seen.append(("connect",))
        return Status.CONTINUE

    @on_helo
    async def helo(ctx: Context[None], hostname: str) -> Status:
        seen.append(("helo",))
        return Status.CONTINUE

    @on_mail
    async def mail(ctx: Context[None], args: list[str]) -> Status:
        seen.append(("mail",))
        return Status.CONTINUE

    @on_rcpt
    def rcpt(ctx: Context[None], args: list[str]) -> Status:
        seen.append(("rcpt",))
        return Status.CONTINUE

    @on_header
    async def header(ctx: Context[None], name: str, value: str) -> Status:
        seen.append(("header",))
        return Status.CONTINUE

    @on_unknown
    def unknown(ctx: Context[None], command: str) -> Status:
        seen.append(("unknown",))
        return Status.CONTINUE

    handlers: dict[str, Handler[Any, object]] = {
        "connect": connect,
        "helo": helo,
        "mail": mail,
        "rcpt": rcpt,
        "header-name": header,
        "header-value": header,
        "unknown": unknown,
    }
    return Milter(f"str-{stage}", handlers=[handlers[stage]])


BAD = b"bad\xff\xfe"


@pytest.mark.parametrize(
    "stage", ["connect", "helo", "mail", "rcpt", "header-name", "header-value", "unknown"]
)
async def test_non_utf8_for_a_str_parameter_answers_tempfail(
    open_milter: OpenMilter, stage: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "triomilter")
    seen: Seen = []
    async with open_milter(str_milter_for(stage, seen)) as client:
        if stage == "connect":
            reply = await client.connect(BAD, None)
        elif stage == "helo":
            reply = await client.helo(BAD)
        elif stage == "unknown":
            reply = await client.unknown(BAD)
            # The milter goes on: the next command reaches the handler.
            assert (await client.unknown("OK")).status is Status.CONTINUE
        elif stage == "mail":
            reply = await client.mail("<a@b>", BAD)
            assert (await client.mail("<ok@b>")).status is Status.CONTINUE
        else:
            await client.mail("<a@b>")  # not sent: no on_mail
            if stage == "rcpt":
                reply = await client.rcpt(BAD)
                assert (await client.rcpt("<ok@b>")).status is Status.CONTINUE
            elif stage == "header-name":
                reply = await client.header(BAD, "v")
            else:
                reply = await client.header("Subject", BAD)
    assert reply == StepReply(Status.TEMPFAIL)
    # The handler never saw the bad data, only the good command after it.
    if stage in ("unknown", "mail", "rcpt"):
        assert seen == [(stage,)]
    else:
        assert seen == []
    (message,) = [r.getMessage() for r in caplog.records if "not UTF-8" in r.getMessage()]
    assert "not called" in message
    assert message.startswith(("[test] ", "[#1] "))  # logged with the connection id
