"""The test client against a scripted engine-based milter: steps, NO_*, NOREPLY, SKIP, verdicts."""

from __future__ import annotations

import pytest

from triomilter import SocketFamily, SocketInfo, Status
from triomilter.protocol import (
    ACCEPT,
    DISCARD,
    REJECT,
    SHUTDOWN,
    SKIP,
    TEMPFAIL,
    Actions,
    AddressFamily,
    Body,
    Command,
    CommandCode,
    Connect,
    Header,
    Helo,
    LocalProtocolError,
    MacroStage,
    Mail,
    MilterConnection,
    ProtocolOpts,
    Rcpt,
    ReplyWithCode,
    Unknown,
)
from triomilter.protocol._constants import NO_STAGE_OPTS, NOREPLY_OPTS
from triomilter.testing import POSTFIX_ACTIONS, POSTFIX_OPTS, StepReply

from ._responder import Answer, Responder, Script, session

CONTINUED = StepReply(Status.CONTINUE)


def answering(**by_code: Answer) -> Script:
    """A script answering the commands named by code letter, CONTINUE to the rest."""

    def script(command: Command, conn: MilterConnection) -> Answer | None:
        return by_code.get(chr(command.code))

    return script


# --- negotiation ------------------------------------------------------------------------


async def test_negotiates_like_postfix_by_default() -> None:
    responder = Responder(
        actions=Actions.ADD_HEADER | Actions.REQUEST_MACROS,
        opts=ProtocolOpts.NO_HELO | ProtocolOpts.SKIP,
        macros=((MacroStage.MAIL, b"{auth_authen} i"), (MacroStage.CONNECT, b"j")),
    )
    async with session(responder) as client:
        assert responder.offer is not None
        assert (responder.offer.version, responder.offer.actions, responder.offer.opts) == (
            6,
            POSTFIX_ACTIONS,
            POSTFIX_OPTS,
        )
        assert client.negotiated_actions == Actions.ADD_HEADER | Actions.REQUEST_MACROS
        assert client.negotiated_opts == ProtocolOpts.NO_HELO | ProtocolOpts.SKIP
        assert client.negotiated.version == 6
        assert client.requested_macros == {
            MacroStage.CONNECT: ["j"],
            MacroStage.MAIL: ["{auth_authen}", "i"],
        }


async def test_offer_is_configurable() -> None:
    responder = Responder(actions=Actions.ADD_HEADER)
    offer_opts = ProtocolOpts.NO_BODY | ProtocolOpts.SKIP
    async with session(responder, actions=Actions.ADD_HEADER, opts=offer_opts, version=2) as c:
        assert responder.offer is not None
        assert (responder.offer.version, responder.offer.actions, responder.offer.opts) == (
            2,
            Actions.ADD_HEADER,
            offer_opts,
        )
        assert c.negotiated.version == 2


# --- every step ---------------------------------------------------------------------------


async def test_every_step_is_sent_and_answered() -> None:
    responder = Responder()
    async with session(responder) as client:
        assert await client.connect("mx.example", ("192.0.2.1", 49152)) == CONTINUED
        assert await client.helo("mx.example") == CONTINUED
        assert await client.mail("<a@example.org>", "SIZE=100", "BODY=8BITMIME") == CONTINUED
        assert await client.rcpt(b"<b@example.net>", b"NOTIFY=NEVER") == CONTINUED
        assert await client.data() == CONTINUED
        assert await client.header("Subject", "hello\n world") == CONTINUED
        assert await client.eoh() == CONTINUED
        assert await client.body("line\r\n") == CONTINUED
        eom = await client.eom()
        assert (eom.status, eom.sent, eom.modifications) == (Status.CONTINUE, True, [])
        await client.abort()
        assert await client.unknown("XFOO bar") == CONTINUED
        await client.close()
        await client.close()  # idempotent
    assert responder.commands == [
        Connect(b"mx.example", AddressFamily.INET, 49152, b"192.0.2.1"),
        Helo(b"mx.example"),
        Mail((b"<a@example.org>", b"SIZE=100", b"BODY=8BITMIME")),
        Rcpt((b"<b@example.net>", b"NOTIFY=NEVER")),
        responder.commands[4],  # DATA
        Header(b"Subject", b"hello\n world"),
        responder.commands[6],  # EOH
        Body(b"line\r\n"),
        responder.commands[8],  # EOM
        Unknown(b"XFOO bar"),
        responder.commands[10],  # QUIT
    ]
    assert responder.codes == "CHMRTLNBEUQ"  # the ABORT after EOM is outside a message


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        (("192.0.2.1", 25), (AddressFamily.INET, 25, b"192.0.2.1")),
        (("2001:db8::1", 587, 0, 0), (AddressFamily.INET6, 587, b"2001:db8::1")),
        (("IPv6:2001:db8::2", 25), (AddressFamily.INET6, 25, b"IPv6:2001:db8::2")),
        ("/run/smtp.sock", (AddressFamily.UNIX, 0, b"/run/smtp.sock")),
        (b"/run/b.sock", (AddressFamily.UNIX, 0, b"/run/b.sock")),
        (None, (AddressFamily.UNKNOWN, 0, b"")),
        (SocketInfo(SocketFamily.INET6, "::1", 2525), (AddressFamily.INET6, 2525, b"::1")),
        (SocketInfo(SocketFamily.UNIX, "/s"), (AddressFamily.UNIX, 0, b"/s")),
    ],
)
async def test_connect_addresses(address: object, expected: tuple[object, ...]) -> None:
    responder = Responder()
    async with session(responder) as client:
        await client.connect("[192.0.2.1]", address)  # type: ignore[arg-type]
    (connect, _quit) = responder.commands
    assert isinstance(connect, Connect)
    assert connect.hostname == b"[192.0.2.1]"
    assert (connect.family, connect.port, connect.address) == expected


async def test_connect_refuses_a_host_name_as_address() -> None:
    async with session(Responder()) as client:
        with pytest.raises(ValueError, match="not an IP address"):
            await client.connect("mx", ("mx.example", 25))
        assert (await client.connect("mx", ("192.0.2.1", 25))).sent  # the session goes on


async def test_macros_before_steps_and_alone() -> None:
    responder = Responder()
    async with session(responder) as client:
        await client.connect("mx", None, macros={"j": "mta.example", "{daemon_name}": "smtpd"})
        await client.helo("mx", macros={b"{tls_version}": b"TLSv1.3"})
        await client.macros(MacroStage.MAIL, {"i": "QID1"})
        await client.macros("M", {"{auth_authen}": "alice"})  # replaces the MAIL set
        await client.mail("<a@b>")
        await client.macros(CommandCode.RCPT, {"{rcpt_addr}": "b@c"})
        await client.rcpt("<b@c>")
    connect, helo, mail, rcpt = responder.seen[:4]
    assert connect.macros == {b"j": b"mta.example", b"daemon_name": b"smtpd"}
    assert helo.macros[b"tls_version"] == b"TLSv1.3"
    assert mail.macros.get(b"auth_authen") == b"alice"
    assert b"i" not in mail.macros
    assert rcpt.macros[b"rcpt_addr"] == b"b@c"


async def test_macro_stage_must_be_one_command_code() -> None:
    async with session(Responder()) as client:
        with pytest.raises(ValueError, match="macro stage"):
            await client.macros("MAIL", {"i": "x"})


async def test_large_body_is_split_like_an_mta() -> None:
    responder = Responder()
    body = bytes(range(256)) * 600  # 153600 bytes
    async with session(responder) as client:
        await client.connect("mx", None)
        await client.mail("<a@b>")
        assert await client.body(body) == CONTINUED
    chunks = [c.chunk for c in responder.commands if isinstance(c, Body)]
    assert [len(chunk) for chunk in chunks] == [65535, 65535, 22530]
    assert b"".join(chunks) == body


async def test_body_split_stops_at_a_decision() -> None:
    responder = Responder(script=answering(B=[REJECT]))
    async with session(responder) as client:
        await client.connect("mx", None)
        await client.mail("<a@b>")
        reply = await client.body(b"x" * 100_000)
        assert (reply.status, reply.sent) == (Status.REJECT, True)
    assert responder.codes == "CMBQ"


async def test_leaving_the_block_quits() -> None:
    responder = Responder()
    async with session(responder) as client:
        await client.connect("mx", None)
    assert responder.codes == "CQ"
    assert responder.done.is_set()


async def test_misuse_is_refused_and_the_session_goes_on() -> None:
    responder = Responder()
    async with session(responder) as client:
        await client.connect("mx", None)
        with pytest.raises(LocalProtocolError, match="cannot send RCPT"):
            await client.rcpt("<b@c>")
        with pytest.raises(LocalProtocolError, match="NUL"):
            await client.helo("a\0b")
        assert await client.mail("<a@b>") == CONTINUED
        await client.close()
        with pytest.raises(LocalProtocolError, match="closed"):
            await client.rcpt("<b@c>")
    assert responder.codes == "CMAQ"  # QUIT in a message: an abort first


async def test_quit_new_connection_keeps_the_negotiation() -> None:
    responder = Responder()
    async with session(responder) as client:
        await client.connect("one", None)
        await client.quit_new_connection()
        assert await client.connect("two", None) == CONTINUED
        assert await client.helo("two") == CONTINUED
    assert responder.codes == "CKCHQ"


# --- statuses and custom replies -------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "status"),
    [(ACCEPT, Status.ACCEPT), (REJECT, Status.REJECT), (TEMPFAIL, Status.TEMPFAIL),
     (DISCARD, Status.DISCARD)],
)  # fmt: skip
async def test_simple_statuses(reply: object, status: Status) -> None:
    async with session(Responder(script=answering(M=[reply]))) as client:  # type: ignore[list-item,unused-ignore]
        await client.connect("mx", None)
        result = await client.mail("<a@b>")
        assert (result.status, result.text, result.sent, result.raw) == (status, None, True, reply)
        assert (result.smtp_code, result.extended_code, result.lines) == (None, None, [])


async def test_single_line_custom_reply() -> None:
    script = answering(H=[ReplyWithCode(b"550 5.7.1 Go away")])
    async with session(Responder(script=script)) as client:
        await client.connect("mx", None)
        reply = await client.helo("spammer")
        assert reply.status is Status.REJECT
        assert reply.text == "550 5.7.1 Go away"
        assert (reply.smtp_code, reply.extended_code, reply.lines) == (550, "5.7.1", ["Go away"])


async def test_multi_line_custom_reply() -> None:
    text = b"451-4.7.1 Greylisted\r\n451-4.7.1 come back\r\n451 4.7.1 later"
    async with session(Responder(script=answering(R=[ReplyWithCode(text)]))) as client:
        await client.connect("mx", None)
        await client.mail("<a@b>")
        reply = await client.rcpt("<b@c>")
        assert reply.status is Status.TEMPFAIL
        assert reply.smtp_code == 451
        assert reply.extended_code == "4.7.1"
        assert reply.lines == ["Greylisted", "come back", "later"]


async def test_custom_reply_without_extended_code() -> None:
    async with session(Responder(script=answering(U=[ReplyWithCode(b"502 No way")]))) as client:
        reply = await client.unknown("XFOO")
        assert (reply.status, reply.smtp_code, reply.extended_code) == (Status.REJECT, 502, None)
        assert reply.lines == ["No way"]


# --- like an MTA: NO_*, NOREPLY_*, SKIP, decisions -----------------------------------------------


async def test_disabled_steps_are_not_sent() -> None:
    responder = Responder(opts=NO_STAGE_OPTS)
    not_sent = StepReply(Status.CONTINUE, sent=False)
    async with session(responder) as client:
        assert await client.connect("mx", None) == not_sent
        assert await client.helo("mx") == not_sent
        assert await client.mail("<a@b>", macros={"i": "QID"}) == not_sent
        assert await client.rcpt("<b@c>") == not_sent
        assert await client.data() == not_sent
        assert await client.header("Subject", "x") == not_sent
        assert await client.eoh() == not_sent
        assert await client.body(b"x" * 70000) == not_sent
        assert await client.unknown("XFOO") == not_sent
        eom = await client.eom()
        assert (eom.status, eom.sent) == (Status.CONTINUE, True)
    assert responder.codes == "EQ"
    # Like Postfix, the macros of a disabled stage are sent all the same.
    assert responder.seen[0].macros[b"i"] == b"QID"


async def test_noreply_steps_await_nothing() -> None:
    responder = Responder(opts=NOREPLY_OPTS)
    noreply = StepReply(Status.NOREPLY)
    async with session(responder) as client:
        assert await client.connect("mx", None) == noreply
        assert await client.helo("mx") == noreply
        assert await client.mail("<a@b>") == noreply
        assert await client.rcpt("<b@c>") == noreply
        assert await client.data() == noreply
        assert await client.header("Subject", "x") == noreply
        assert await client.eoh() == noreply
        assert await client.body(b"x" * 70000) == noreply
        assert (await client.eom()).status is Status.CONTINUE  # always answered
        assert await client.unknown("XFOO") == noreply
    assert responder.codes == "CHMRTLNBBEUQ"


async def test_skip_stops_the_body_of_this_message_only() -> None:
    def script(command: Command, conn: MilterConnection) -> Answer | None:
        return [SKIP] if isinstance(command, Body) else None

    responder = Responder(opts=ProtocolOpts.SKIP, script=script)
    async with session(responder) as client:
        await client.connect("mx", None)
        await client.mail("<a@b>")
        assert (await client.body(b"x" * 100_000)).status is Status.SKIP  # first chunk only
        assert await client.body(b"more") == StepReply(Status.SKIP, sent=False)
        assert (await client.eom()).sent
        await client.mail("<a@b>")
        assert (await client.body(b"again")).sent
    assert responder.codes == "CMBEMBAQ"


async def test_a_decided_message_gets_no_more_steps() -> None:
    responder = Responder(script=answering(M=[REJECT]))
    rejected = StepReply(Status.REJECT, sent=False)
    async with session(responder) as client:
        await client.connect("mx", None)
        assert (await client.mail("<a@b>")).status is Status.REJECT
        assert await client.rcpt("<b@c>") == rejected
        assert await client.data() == rejected
        assert await client.header("A", "b") == rejected
        assert await client.eoh() == rejected
        assert await client.body(b"x") == rejected
        eom = await client.eom()
        assert (eom.status, eom.sent) == (Status.REJECT, False)
        await client.abort()
        responder.script = None
        assert await client.mail("<c@d>") == CONTINUED  # a new message
        assert await client.rcpt("<b@c>") == CONTINUED
    assert responder.codes == "CMMRAQ"


async def test_accept_at_rcpt_ends_the_message_but_reject_only_the_recipient() -> None:
    def script(command: Command, conn: MilterConnection) -> Answer | None:
        if isinstance(command, Rcpt):
            return [REJECT] if command.args[0] == b"<bad@c>" else [ACCEPT]
        return None

    responder = Responder(script=script)
    async with session(responder) as client:
        await client.connect("mx", None)
        await client.mail("<a@b>")
        assert (await client.rcpt("<bad@c>")).status is Status.REJECT
        assert (await client.rcpt("<good@c>")).status is Status.ACCEPT
        assert await client.data() == StepReply(Status.ACCEPT, sent=False)
    assert responder.codes == "CMRRQ"


async def test_a_decided_connection_gets_no_more_steps() -> None:
    responder = Responder(script=answering(C=[ReplyWithCode(b"554 5.7.1 Not you")]))
    async with session(responder) as client:
        assert (await client.connect("mx", None)).status is Status.REJECT
        assert await client.helo("mx") == StepReply(Status.REJECT, sent=False)
        assert await client.mail("<a@b>") == StepReply(Status.REJECT, sent=False)
        assert (await client.eom()).sent is False
        assert await client.unknown("X") == StepReply(Status.REJECT, sent=False)
        await client.abort()
    assert responder.codes == "CQ"


async def test_shutdown_is_a_tempfail_of_the_connection() -> None:
    responder = Responder(script=answering(M=[SHUTDOWN]))
    async with session(responder) as client:
        await client.connect("mx", None)
        reply = await client.mail("<a@b>")
        assert (reply.status, reply.raw) == (Status.TEMPFAIL, SHUTDOWN)
        assert await client.mail("<a@b>") == StepReply(Status.TEMPFAIL, sent=False)


# --- send_message ------------------------------------------------------------------------------


async def test_send_message_runs_the_whole_message() -> None:
    responder = Responder()
    async with session(responder) as client:
        await client.connect("mx", None)
        result = await client.send_message(
            "<a@b>", ["<b@c>", "<d@e>"], {"From": "a@b", "Subject": "hi"}, "body\r\n"
        )
        assert (result.status, result.sent) == (Status.CONTINUE, True)
        await client.send_message("<a@b>", "<b@c>", [("To", "b@c")])
    assert responder.codes == "C" + "MRRTLLNBE" + "MRTLNE" + "Q"


async def test_send_message_stops_like_an_mta() -> None:
    responder = Responder(script=answering(R=[REJECT]))
    async with session(responder) as client:
        await client.connect("mx", None)
        result = await client.send_message("<a@b>", ["<b@c>", "<d@e>"], body=b"x")
        assert (result.status, result.sent) == (Status.REJECT, False)
        responder.script = answering(L=[DISCARD])
        result = await client.send_message("<a@b>", ["<b@c>"], {"A": "1", "B": "2"}, b"x")
        assert (result.status, result.sent) == (Status.DISCARD, False)
    assert responder.codes == "C" + "MRRA" + "MRTL" + "Q"


async def test_discard_at_rcpt_ends_the_message_like_postfix() -> None:
    """DISCARD is about the whole message, even at RCPT: nothing more of it is sent."""
    responder = Responder(script=answering(R=[DISCARD]))
    async with session(responder) as client:
        await client.connect("mx", None)
        result = await client.send_message("<a@b>", ["<b@c>", "<d@e>"], {"A": "1"}, b"x")
        assert (result.status, result.sent) == (Status.DISCARD, False)
        responder.script = None
        assert await client.mail("<c@d>") == CONTINUED  # the next message is sent again
    # One RCPT only; no DATA, header, body or end of message after the discard
    # (the milter's engine reports the next MAIL and the QUIT as ending a message).
    assert responder.codes == "CMRAMAQ"
