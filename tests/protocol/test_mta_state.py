"""The MTA role: what an MTA may send and which replies it must accept.

`MtaConnection` refuses to *send* what a correct MTA never sends
(`LocalProtocolError`) and refuses to *accept* replies a strict MTA would
reject (`RemoteProtocolError`), checked against real reply bytes.
"""

from __future__ import annotations

import pytest

from triomilter.protocol import (
    ABORT,
    ACCEPT,
    ALL_ACTIONS,
    CONTINUE,
    DATA,
    END_OF_HEADERS,
    PROGRESS,
    QUIT,
    QUIT_NEW_CONNECTION,
    REJECT,
    SKIP,
    Actions,
    AddHeader,
    AddressFamily,
    Body,
    ChangeHeader,
    Command,
    Connect,
    DefineMacros,
    EndOfMessage,
    Header,
    Helo,
    LocalProtocolError,
    MacroStage,
    Mail,
    MtaConnection,
    OptionNegotiation,
    OptionNegotiationReply,
    ProtocolOpts,
    Rcpt,
    RemoteProtocolError,
    ReplaceBody,
    ReplyWithCode,
    State,
    Unknown,
)

from ._helpers import POSTFIX_OFFER, POSTFIX_OFFER_BYTES, feed_replies, frame, mta, strings

P = ProtocolOpts
A = Actions

CONNECT = Connect(b"client.example", AddressFamily.INET, 25, b"192.0.2.1")
HELO = Helo(b"client.example")
MAIL = Mail((b"<a@b>",))
RCPT = Rcpt((b"<c@d>",))
HEADER = Header(b"Subject", b"hi")
BODY = Body(b"body\r\n")
EOM = EndOfMessage()
UNKNOWN = Unknown(b"HELP")

C_ = frame("c")


def drive(conn: MtaConnection, *commands: Command) -> None:
    """Send ``commands``, answering every awaited reply with CONTINUE bytes."""
    for command in commands:
        conn.send(command)
        if conn.awaiting is not None:
            assert feed_replies(conn, C_) == [CONTINUE]


ALL_ACTIONS = ALL_ACTIONS


def at(code: str, actions: Actions = ALL_ACTIONS, opts: ProtocolOpts = P.SKIP) -> MtaConnection:
    """An MTA connection awaiting the reply to command ``code``."""
    path: dict[str, tuple[Command, ...]] = {
        "C": (),
        "H": (),
        "M": (),
        "R": (MAIL,),
        "T": (MAIL, RCPT),
        "L": (MAIL, RCPT, DATA),
        "N": (MAIL, RCPT, DATA, HEADER),
        "B": (MAIL, RCPT, DATA, HEADER, END_OF_HEADERS),
        "E": (MAIL, RCPT, DATA, HEADER, END_OF_HEADERS, BODY),
        "U": (),
    }
    last: dict[str, Command] = {
        "C": CONNECT,
        "H": HELO,
        "M": MAIL,
        "R": RCPT,
        "T": DATA,
        "L": HEADER,
        "N": END_OF_HEADERS,
        "B": BODY,
        "E": EOM,
        "U": UNKNOWN,
    }
    conn = mta(actions, opts, connect=code != "C")
    drive(conn, *path[code])
    conn.send(last[code])
    assert conn.awaiting == ord(code)
    return conn


# --- sending: order ---------------------------------------------------------------


def test_fresh_connection() -> None:
    conn = MtaConnection()
    assert conn.state is State.NEGOTIATE
    assert conn.negotiated is None
    assert conn.awaiting is None
    assert not conn.is_disabled(ord("C"))
    assert conn.expects_reply(ord("C"))
    assert not conn.in_message


@pytest.mark.parametrize(
    "command", [CONNECT, HELO, MAIL, EOM, ABORT, QUIT_NEW_CONNECTION, DefineMacros(ord("C"))]
)
def test_nothing_before_the_offer(command: Command) -> None:
    conn = MtaConnection()
    with pytest.raises(LocalProtocolError, match="waiting for option negotiation"):
        conn.send(command)
    assert conn.state is State.NEGOTIATE
    assert conn.send(POSTFIX_OFFER) == POSTFIX_OFFER_BYTES


def test_quit_before_the_offer() -> None:
    conn = MtaConnection()
    assert conn.send(QUIT) == frame("Q")
    assert conn.state is State.CLOSED
    assert conn.awaiting is None


@pytest.mark.parametrize(
    ("before", "bad", "state"),
    [
        ((), MAIL, State.CONNECT),
        ((), EOM, State.CONNECT),
        ((CONNECT,), RCPT, State.SESSION),
        ((CONNECT,), CONNECT, State.SESSION),
        ((CONNECT,), POSTFIX_OFFER, State.SESSION),
        ((CONNECT, MAIL, RCPT, DATA, HEADER, END_OF_HEADERS, BODY), HEADER, State.BODY),
        ((CONNECT, MAIL, RCPT, DATA, HEADER, END_OF_HEADERS), DATA, State.EOH),
        ((CONNECT, QUIT), CONNECT, State.CLOSED),
    ],
    ids=["mail-first", "eom-first", "rcpt-before-mail", "second-connect", "second-optneg",
         "header-after-body", "data-after-eoh", "after-quit"],
)  # fmt: skip
def test_out_of_order_sends(before: tuple[Command, ...], bad: Command, state: State) -> None:
    conn = mta(connect=False)
    drive(conn, *before)
    with pytest.raises(LocalProtocolError, match=rf"cannot send .* {state.value}; expected one of"):
        conn.send(bad)
    assert conn.state is state


def test_macros_after_quit_are_refused() -> None:
    conn = mta()
    conn.send(QUIT)
    with pytest.raises(LocalProtocolError, match="cannot send macros closed"):
        conn.send(DefineMacros(ord("C")))


@pytest.mark.parametrize("code", list("CHMRTLNBEU"))
def test_nothing_while_a_reply_is_pending(code: str) -> None:
    conn = at(code)
    for command in (DefineMacros(ord("R")), RCPT, ABORT, QUIT):
        with pytest.raises(LocalProtocolError, match="is still pending"):
            conn.send(command)
    assert conn.awaiting == ord(code)


def test_nothing_while_the_negotiation_reply_is_pending() -> None:
    conn = MtaConnection()
    conn.send(POSTFIX_OFFER)
    with pytest.raises(LocalProtocolError, match=r"reply to OPTNEG \('O'\) is still pending"):
        conn.send(CONNECT)


def test_a_full_session() -> None:
    conn = mta(connect=False)
    wire = b""
    for command in (
        DefineMacros(ord("C"), ((b"j", b"mx"),)),
        CONNECT,
        HELO,
        MAIL,
        RCPT,
        DATA,
        HEADER,
        END_OF_HEADERS,
        BODY,
        EOM,
        ABORT,
        UNKNOWN,
        QUIT,
    ):
        wire += conn.send(command)
        if conn.awaiting is not None:
            feed_replies(conn, C_)
    assert conn.state is State.CLOSED
    assert wire.startswith(frame("D", b"Cj\0mx\0") + CONNECT.encode())
    assert wire.endswith(frame("E") + frame("A") + frame("U", b"HELP\0") + frame("Q"))


def test_abort_outside_a_message_is_sent_without_effect() -> None:
    conn = mta()
    assert conn.send(ABORT) == frame("A")
    assert conn.state is State.SESSION
    assert conn.awaiting is None


def test_mail_inside_a_message_is_allowed() -> None:
    # Sendmail sends no A after a milter decided; the engine aborts implicitly.
    conn = mta()
    drive(conn, MAIL, RCPT)
    conn.send(MAIL)
    assert conn.awaiting == ord("M")
    assert conn.state is State.MAIL


def test_quit_new_connection_then_connect() -> None:
    conn = mta()
    drive(conn, MAIL, RCPT)
    assert conn.send(QUIT_NEW_CONNECTION) == frame("K")
    assert conn.state is State.CONNECT
    assert conn.awaiting is None
    conn.send(CONNECT)
    assert conn.awaiting == ord("C")


def test_unencodable_command_leaves_the_state_alone() -> None:
    conn = mta()
    with pytest.raises(LocalProtocolError, match=r"MAIL \('M'\): cannot be encoded.*NUL"):
        conn.send(Mail((b"<a\0b>",)))
    with pytest.raises(LocalProtocolError, match="cannot be encoded"):
        conn.send(Connect(b"h", AddressFamily.INET, 70000, b"a"))
    assert conn.state is State.SESSION
    assert conn.awaiting is None
    conn.send(MAIL)
    assert conn.awaiting == ord("M")


# --- sending: NO_* and NR_* -----------------------------------------------------------

DISABLED = [
    (P.NO_HELO, HELO, ()),
    (P.NO_MAIL, MAIL, ()),
    (P.NO_RCPT, RCPT, (MAIL,)),
    (P.NO_DATA, DATA, (MAIL, RCPT)),
    (P.NO_HEADER, HEADER, (MAIL, RCPT, DATA)),
    (P.NO_EOH, END_OF_HEADERS, (MAIL, RCPT, DATA)),
    (P.NO_BODY, BODY, (MAIL, RCPT, DATA, END_OF_HEADERS)),
    (P.NO_UNKNOWN, UNKNOWN, ()),
]


@pytest.mark.parametrize(
    ("flag", "command", "before"), DISABLED, ids=lambda v: getattr(v, "name", "")
)
def test_disabled_commands_are_refused(
    flag: ProtocolOpts, command: Command, before: tuple[Command, ...]
) -> None:
    conn = mta(opts=flag)
    drive(conn, *before)
    assert conn.is_disabled(command.code)
    with pytest.raises(LocalProtocolError, match=r"negotiated not to receive .*\(NO_\* step\)"):
        conn.send(command)
    # Postfix still sends the D packet of a disabled stage: allowed.
    assert conn.send(DefineMacros(command.code)) == frame("D", bytes((command.code,)))


def test_no_connect_starts_without_connect() -> None:
    conn = mta(opts=P.NO_CONNECT)
    assert conn.state is State.SESSION
    with pytest.raises(LocalProtocolError, match="negotiated not to receive"):
        conn.send(CONNECT)
    drive(conn, HELO, MAIL, RCPT, EOM)
    assert conn.state is State.SESSION


def test_disabled_stages_are_skipped_over() -> None:
    conn = mta(opts=P.NO_MAIL | P.NO_DATA)
    drive(conn, RCPT, HEADER, END_OF_HEADERS, EOM)
    assert conn.state is State.SESSION


NOREPLY = [
    (P.NOREPLY_CONNECT, CONNECT, ()),
    (P.NOREPLY_HELO, HELO, (CONNECT,)),
    (P.NOREPLY_MAIL, MAIL, (CONNECT,)),
    (P.NOREPLY_RCPT, RCPT, (CONNECT, MAIL)),
    (P.NOREPLY_DATA, DATA, (CONNECT, MAIL, RCPT)),
    (P.NOREPLY_HEADER, HEADER, (CONNECT, MAIL, RCPT, DATA)),
    (P.NOREPLY_EOH, END_OF_HEADERS, (CONNECT, MAIL, RCPT, DATA)),
    (P.NOREPLY_BODY, BODY, (CONNECT, MAIL, RCPT, DATA)),
    (P.NOREPLY_UNKNOWN, UNKNOWN, (CONNECT,)),
]


@pytest.mark.parametrize(
    ("flag", "command", "before"), NOREPLY, ids=lambda v: getattr(v, "name", "")
)
def test_noreply_stages_await_nothing(
    flag: ProtocolOpts, command: Command, before: tuple[Command, ...]
) -> None:
    conn = mta(opts=flag, connect=False)
    drive(conn, *before)
    assert not conn.expects_reply(command.code)
    conn.send(command)
    assert conn.awaiting is None
    # A reply anyway desynchronises the stream (libmilter's "claimed not to reply").
    with pytest.raises(RemoteProtocolError, match=r"unsolicited CONTINUE \('c'\)"):
        feed_replies(conn, C_)


@pytest.mark.parametrize("code", ["D", "A", "Q", "K"])
def test_commands_that_never_expect_a_reply(code: str) -> None:
    assert not mta().expects_reply(ord(code))


def test_eom_always_expects_a_reply() -> None:
    conn = mta(opts=P(0x000FF000) | P.NOREPLY_HEADER)
    assert conn.expects_reply(ord("E"))


# --- receiving ------------------------------------------------------------------------


def test_unsolicited_replies() -> None:
    conn = mta()
    with pytest.raises(RemoteProtocolError, match=r"unsolicited CONTINUE \('c'\)"):
        feed_replies(conn, C_)
    conn = mta()
    drive(conn, MAIL, RCPT)
    conn.send(ABORT)
    with pytest.raises(RemoteProtocolError, match=r"unsolicited REJECT \('r'\)"):
        feed_replies(conn, frame("r"))


def test_a_second_final_reply_is_unsolicited() -> None:
    conn = at("M")
    with pytest.raises(RemoteProtocolError, match="unsolicited"):
        feed_replies(conn, C_ + C_)


@pytest.mark.parametrize("code", ["l", "f", "X", "\x00"])
def test_reply_codes_a_milter_may_not_send(code: str) -> None:
    conn = at("M")
    with pytest.raises(RemoteProtocolError, match="is not a reply a milter may send"):
        feed_replies(conn, frame(code))


def test_malformed_reply_payload() -> None:
    conn = at("E", actions=A.ADD_HEADER)
    with pytest.raises(RemoteProtocolError, match=r"ADDHEADER \('h'\)"):
        feed_replies(conn, frame("h", b"X-Only-Name\0"))


@pytest.mark.parametrize("code", list("CHMRTLNBEU"))
def test_negotiation_reply_only_to_the_offer(code: str) -> None:
    conn = at(code)
    with pytest.raises(RemoteProtocolError, match=r"OPTNEG \('O'\) is not a valid reply to"):
        feed_replies(conn, frame("O", bytes(12)))


def test_only_the_negotiation_reply_answers_the_offer() -> None:
    conn = MtaConnection()
    conn.send(POSTFIX_OFFER)
    with pytest.raises(
        RemoteProtocolError, match=r"CONTINUE \('c'\) is not a valid reply to OPTNEG"
    ):
        feed_replies(conn, C_)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (bytes.fromhex("00000007 00000000 00000000"), "version 7 does not fit the offered 6"),
        (bytes.fromhex("00000001 00000000 00000000"), "version 1"),
        (bytes.fromhex("00000006 00000200 00000000"), "actions not offered"),
        (bytes.fromhex("00000006 00000000 00200000"), "protocol steps not offered"),
        (
            bytes.fromhex("00000006 00000100 00000000") + b"\0\0\0\x02i\0\0\0\0\x02j\0",
            "two macro lists for stage MAIL",
        ),
    ],
    ids=["version-high", "version-low", "action", "step", "macro-twice"],
)
def test_negotiation_reply_strictness(payload: bytes, message: str) -> None:
    conn = MtaConnection()
    conn.send(POSTFIX_OFFER)
    with pytest.raises(RemoteProtocolError, match=message):
        feed_replies(conn, frame("O", payload))
    assert conn.negotiated is None


def test_negotiation_reply_against_an_old_offer() -> None:
    conn = MtaConnection()
    conn.send(OptionNegotiation(2, A(0x3F), P(0x7F)))
    with pytest.raises(RemoteProtocolError, match="steps not offered"):
        feed_replies(conn, frame("O", bytes.fromhex("00000002 00000000 00000080")))


def test_negotiation_reply_records_the_agreement() -> None:
    conn = MtaConnection()
    conn.send(POSTFIX_OFFER)
    payload = bytes.fromhex("00000006 00000101 10000090") + b"\0\0\0\x05{msg_id}\0"
    (reply,) = feed_replies(conn, frame("O", payload))
    assert isinstance(reply, OptionNegotiationReply)
    assert conn.negotiated is not None
    assert conn.negotiated.version == 6
    assert conn.negotiated.actions == A.ADD_HEADER | A.REQUEST_MACROS
    assert conn.negotiated.opts == P.NO_BODY | P.NOREPLY_HEADER  # MDS bit stripped
    assert dict(conn.negotiated.macros) == {MacroStage.EOM: b"{msg_id}"}
    assert conn.state is State.CONNECT
    assert conn.is_disabled(ord("B"))
    assert not conn.expects_reply(ord("L"))


@pytest.mark.parametrize(
    ("code", "reply"),
    [("C", "d"), ("H", "d"), ("U", "a"), ("U", "d"), ("M", "s"), ("E", "s"), ("C", "p")],
)
def test_final_replies_not_valid_for_the_stage(code: str, reply: str) -> None:
    conn = at(code)
    with pytest.raises(RemoteProtocolError, match="is not a valid reply to"):
        feed_replies(conn, frame(reply))


def test_skip_only_if_negotiated() -> None:
    assert feed_replies(at("B", opts=P.SKIP), frame("s")) == [SKIP]
    conn = at("B", opts=P.NONE)
    with pytest.raises(
        RemoteProtocolError, match=r"SKIP \('s'\) reply, but SKIP was not negotiated"
    ):
        feed_replies(conn, frame("s"))


def test_skip_keeps_the_message_open() -> None:
    conn = at("B", opts=P.SKIP)
    feed_replies(conn, frame("s"))
    assert conn.state is State.BODY
    assert conn.awaiting is None
    conn.send(EOM)
    assert conn.awaiting == ord("E")


@pytest.mark.parametrize(
    ("wire", "action"),
    [
        (frame("h", strings(b"X-A", b"1")), A.ADD_HEADER),
        (frame("i", b"\0\0\0\0" + strings(b"X-A", b"1")), A.ADD_HEADER),
        (frame("m", b"\0\0\0\x01" + strings(b"Subject", b"")), A.REPLACE_HEADER),
        (frame("+", strings(b"<n@x>")), A.ADD_RECIPIENT),
        (frame("2", strings(b"<n@x>", b"NOTIFY=NEVER")), A.ADD_RECIPIENT_EXT),
        (frame("-", strings(b"<c@d>")), A.REMOVE_RECIPIENT),
        (frame("e", strings(b"<s@x>")), A.REPLACE_SENDER),
        (frame("b", b"new body"), A.REPLACE_BODY),
        (frame("q", strings(b"held")), A.QUARANTINE),
    ],
    ids=list("him+2-ebq"),
)
def test_modifications_only_at_eom_and_only_if_negotiated(wire: bytes, action: Actions) -> None:
    conn = at("E", actions=action)
    (reply,) = feed_replies(conn, wire)
    assert reply.code == wire[4]
    assert conn.awaiting == ord("E")
    assert feed_replies(conn, C_) == [CONTINUE]
    assert conn.state is State.SESSION

    conn = at("E", actions=ALL_ACTIONS & ~action)
    with pytest.raises(RemoteProtocolError, match=r"needs the .* action, which was not negotiated"):
        feed_replies(conn, wire)

    for stage in "CMRLB":
        conn = at(stage, actions=action)
        with pytest.raises(RemoteProtocolError, match="is not a valid reply to"):
            feed_replies(conn, wire)


def test_progress_at_eom() -> None:
    conn = at("E", actions=A.NONE)
    assert feed_replies(conn, frame("p") * 3 + frame("a")) == [PROGRESS] * 3 + [ACCEPT]
    assert conn.awaiting is None


def test_replace_body_chunks_must_be_contiguous() -> None:
    conn = at("E")
    replies = feed_replies(
        conn, frame("b", b"1") + frame("p") + frame("b", b"2") + frame("h", strings(b"X", b"y"))
    )
    assert replies == [ReplaceBody(b"1"), PROGRESS, ReplaceBody(b"2"), AddHeader(b"X", b"y")]
    with pytest.raises(RemoteProtocolError, match="must be contiguous"):
        feed_replies(conn, frame("b", b"3"))


def test_body_run_restarts_per_message() -> None:
    conn = at("E")
    feed_replies(conn, frame("b", b"1") + frame("m", b"\0\0\0\x01" + strings(b"X", b"")) + C_)
    drive(conn, MAIL, RCPT)
    conn.send(EOM)
    assert feed_replies(conn, frame("b", b"again") + C_) == [ReplaceBody(b"again"), CONTINUE]


@pytest.mark.parametrize("text", [b"250 ok", b"", b"x", b"354 go on", b"650 bad"])
def test_reply_code_must_be_4xx_or_5xx(text: bytes) -> None:
    conn = at("R")
    with pytest.raises(RemoteProtocolError, match=r"REPLYCODE \('y'\) is not a 4xx/5xx reply"):
        feed_replies(conn, frame("y", text + b"\0"))


@pytest.mark.parametrize("text", [b"550 5.7.1 no", b"421 4.3.2 shutting down"])
def test_reply_code_ends_the_message(text: bytes) -> None:
    conn = at("M")
    assert feed_replies(conn, frame("y", text + b"\0")) == [ReplyWithCode(text)]
    assert conn.state is State.SESSION
    with pytest.raises(LocalProtocolError, match="cannot send RCPT"):
        conn.send(RCPT)


# --- reply-driven state -----------------------------------------------------------------


@pytest.mark.parametrize("reply", list("artd4"))
def test_deciding_reply_at_mail_ends_the_message(reply: str) -> None:
    conn = at("M")
    feed_replies(conn, frame(reply))
    assert conn.state is State.SESSION
    with pytest.raises(LocalProtocolError, match=r"cannot send RCPT .*between messages"):
        conn.send(RCPT)
    conn.send(MAIL)  # a new message, no abort needed
    assert conn.awaiting == ord("M")


@pytest.mark.parametrize("reply", list("rtd"))
def test_recipient_level_replies_keep_the_message(reply: str) -> None:
    conn = at("R")
    feed_replies(conn, frame(reply))
    assert conn.state is State.RCPT
    drive(conn, RCPT, DATA)


def test_accept_at_rcpt_ends_the_message() -> None:
    conn = at("R")
    assert feed_replies(conn, frame("a")) == [ACCEPT]
    assert conn.state is State.SESSION
    assert not conn.in_message


def test_connection_level_reject_keeps_the_state() -> None:
    conn = at("C")
    assert feed_replies(conn, frame("r")) == [REJECT]
    assert conn.state is State.SESSION


def test_replies_in_arbitrary_splits() -> None:
    wire = frame("h", strings(b"X-A", b"1")) + frame("p") + frame("b", b"x" * 300) + frame("a")
    expected = [AddHeader(b"X-A", b"1"), PROGRESS, ReplaceBody(b"x" * 300), ACCEPT]
    for step in (1, 2, 5, 17, len(wire)):
        conn = at("E")
        got = []
        for i in range(0, len(wire), step):
            got += feed_replies(conn, wire[i : i + step])
        assert got == expected
        assert conn.awaiting is None


def test_change_header_index_round_trips() -> None:
    conn = at("E")
    (reply,) = feed_replies(conn, frame("m", b"\xff\xff\xff\xff" + strings(b"X", b"v")))
    assert reply == ChangeHeader(0xFFFFFFFF, b"X", b"v")
