"""The milter role's state machine: order, tolerance, owed replies, reply rules,
reply-driven resets, macro scoping and negotiation (protocol.md §3-§7)."""

from __future__ import annotations

import re
from collections.abc import Sequence

import pytest

from triomilter.protocol import (
    ABORT,
    ACCEPT,
    ALL_ACTIONS,
    ALL_PROTOCOL_OPTS,
    CONTINUE,
    DISCARD,
    PROGRESS,
    QUIT,
    QUIT_NEW_CONNECTION,
    REJECT,
    SHUTDOWN,
    SKIP,
    TEMPFAIL,
    Abort,
    Actions,
    AddHeader,
    AddRecipient,
    AddRecipientExt,
    AddressFamily,
    ChangeHeader,
    ChangeSender,
    Connect,
    DeleteRecipient,
    EndOfMessage,
    Header,
    Helo,
    InsertHeader,
    LocalProtocolError,
    MacroStage,
    Mail,
    MilterConnection,
    NegotiationError,
    OptionNegotiation,
    OptionNegotiationReply,
    ProtocolOpts,
    Quarantine,
    Quit,
    Rcpt,
    RemoteProtocolError,
    ReplaceBody,
    Reply,
    ReplyWithCode,
    State,
    Unknown,
    check_reply,
    negotiate,
    negotiate_all,
)
from triomilter.protocol import (
    DATA as DATA_COMMAND,
)

from ._helpers import POSTFIX_OFFER, events, frame, macro_frame, milter, mta, one_event, strings

P = ProtocolOpts
A = Actions

OFFER = POSTFIX_OFFER.encode()
CONN = frame("C", b"client.example\x004\x00\x19192.0.2.1\0")
HELO = frame("H", strings(b"client.example"))
MAIL = frame("M", strings(b"<a@b>"))
MAIL2 = frame("M", strings(b"<x@y>", b"SIZE=10"))
RCPT = frame("R", strings(b"<c@d>"))
DATA = frame("T")
HDR = frame("L", strings(b"Subject", b"hi"))
EOH = frame("N")
BODY = frame("B", b"body\r\n")
EOM = frame("E")
ABRT = frame("A")
QUIT_ = frame("Q")
QNC = frame("K")
UNK = frame("U", strings(b"HELP"))

TO_BODY = MAIL + RCPT + DATA + HDR + EOH + BODY


def kinds(evs: Sequence[object]) -> list[str]:
    return [type(e).__name__ for e in evs]


def unexpected(command: str, state: State, expected: str) -> str:
    """A regex for the engine's order-error message."""
    return (
        rf"unexpected {command} \('.'\) {re.escape(state.value)}; "
        rf"expected one of: .*\b{expected}\b"
    )


# --- order rules -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("before", "bad", "command", "state", "expected"),
    [
        (b"", EOM, "EOM", State.CONNECT, "CONNECT"),
        (b"", HELO, "HELO", State.CONNECT, "CONNECT"),
        (b"", MAIL, "MAIL", State.CONNECT, "CONNECT"),
        (CONN, RCPT, "RCPT", State.SESSION, "MAIL"),
        (CONN, DATA, "DATA", State.SESSION, "MAIL"),
        (CONN, EOM, "EOM", State.SESSION, "HELO"),
        (CONN, CONN, "CONNECT", State.SESSION, "MAIL"),
        (CONN, OFFER, "OPTNEG", State.SESSION, "MAIL"),
        (CONN + TO_BODY, HDR, "HEADER", State.BODY, "BODY"),
        (CONN + TO_BODY, EOH, "EOH", State.BODY, "EOM"),
        (CONN + TO_BODY, RCPT, "RCPT", State.BODY, "EOM"),
        (CONN + MAIL + RCPT + DATA + HDR + EOH, HDR, "HEADER", State.EOH, "BODY"),
        (CONN + MAIL + RCPT + DATA + HDR + EOH, DATA, "DATA", State.EOH, "EOM"),
        (CONN + MAIL + RCPT + DATA, RCPT, "RCPT", State.DATA, "HEADER"),
        (CONN + MAIL + RCPT + DATA + HDR, DATA, "DATA", State.HEADERS, "EOH"),
        (CONN + MAIL, CONN, "CONNECT", State.MAIL, "RCPT"),
    ],
    ids=lambda v: v.name if isinstance(v, State) else v if isinstance(v, str) else "",
)
def test_out_of_order_commands(
    before: bytes, bad: bytes, command: str, state: State, expected: str
) -> None:
    conn = milter(connect=False)
    events(conn, before)
    assert conn.state is state
    conn.receive_data(bad)
    with pytest.raises(RemoteProtocolError, match=unexpected(command, state, expected)):
        conn.next_event()


def test_nothing_after_quit() -> None:
    conn = milter()
    events(conn, QUIT_)
    for wire in (CONN, MAIL, QUIT_, ABRT):
        conn.receive_data(wire)
        with pytest.raises(RemoteProtocolError, match=r"^unexpected [A-Z]+ \('.'\) closed"):
            conn.next_event()
        conn = milter()
        events(conn, QUIT_)


def test_second_optneg_is_refused() -> None:
    conn = milter(connect=False)
    assert conn.state is State.CONNECT
    conn.receive_data(OFFER)
    with pytest.raises(RemoteProtocolError, match=unexpected("OPTNEG", State.CONNECT, "CONNECT")):
        conn.next_event()


@pytest.mark.parametrize("first", [macro_frame("C", (b"j", b"x")), CONN, HELO, ABRT, UNK, QNC])
def test_nothing_but_optneg_or_quit_before_negotiation(first: bytes) -> None:
    conn = MilterConnection()
    assert conn.state is State.NEGOTIATE
    conn.receive_data(first)
    with pytest.raises(RemoteProtocolError, match=r"waiting for option negotiation; expected") as e:
        conn.next_event()
    assert "OPTNEG, QUIT" in str(e.value)


def test_macro_before_optneg_names_the_command() -> None:
    conn = MilterConnection()
    conn.receive_data(frame("D", b"Cj\0x\0"))
    with pytest.raises(
        RemoteProtocolError,
        match=r"^unexpected MACRO \('D'\) waiting for option negotiation; "
        r"expected one of: OPTNEG, QUIT$",
    ):
        conn.next_event()


def test_quit_before_negotiation_ends_the_session() -> None:
    conn = MilterConnection()
    assert events(conn, QUIT_) == [QUIT]
    assert conn.state is State.CLOSED
    assert conn.owed is None


def test_macro_after_quit_is_refused() -> None:
    conn = milter()
    assert events(conn, QUIT_) == [QUIT]
    conn.receive_data(macro_frame("C"))
    with pytest.raises(RemoteProtocolError, match=r"unexpected MACRO \('D'\) closed"):
        conn.next_event()


def test_unknown_command_code_ends_the_session() -> None:
    conn = milter()
    conn.receive_data(frame("X", b"whatever"))
    with pytest.raises(RemoteProtocolError, match=r"unknown command b'X' is not a milter command"):
        conn.next_event()


def test_malformed_payload_names_the_command() -> None:
    conn = milter()
    conn.receive_data(frame("H", b"no terminator"))
    with pytest.raises(RemoteProtocolError, match=r"HELO \('H'\): payload is not NUL-terminated"):
        conn.next_event()


def test_a_malformed_command_moves_nothing_and_the_error_is_final() -> None:
    """h11's rule: after a protocol error the session is in ERROR and later calls raise."""
    conn = milter()
    conn.receive_data(frame("M", b"no terminator") + MAIL)
    with pytest.raises(RemoteProtocolError, match=r"MAIL \('M'\): payload is not NUL"):
        conn.next_event()
    assert conn.state is State.ERROR
    assert not conn.in_message  # the malformed MAIL did not open a message
    # The valid MAIL behind it is not handed out (it once came as a made-up Abort()).
    with pytest.raises(RemoteProtocolError, match="already failed: MAIL"):
        conn.next_event()
    conn.receive_data(RCPT)
    with pytest.raises(RemoteProtocolError, match="already failed"):
        conn.next_event()


def test_an_mta_side_error_is_final_too() -> None:
    conn = mta()
    conn.send(Mail((b"<a@b>",)))
    conn.receive_data(frame("z"))
    with pytest.raises(RemoteProtocolError, match="not a reply a milter may send"):
        conn.next_event()
    conn.receive_data(frame("c"))
    with pytest.raises(RemoteProtocolError, match="already failed"):
        conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.send(Rcpt((b"<c@d>",)))


def test_next_event_while_a_reply_is_owed() -> None:
    conn = milter()
    assert one_event(conn, MAIL) == Mail((b"<a@b>",))
    conn.receive_data(RCPT)
    with pytest.raises(LocalProtocolError, match=r"reply to MAIL \('M'\) is still owed"):
        conn.next_event()
    conn.send(CONTINUE)
    assert conn.next_event() == Rcpt((b"<c@d>",))


def test_stages_may_be_skipped_like_libmilter() -> None:
    # A message without headers or body: MAIL, RCPT, DATA, EOH, EOM.
    conn = milter()
    evs = events(conn, MAIL + RCPT + DATA + EOH + EOM)
    assert kinds(evs) == ["Mail", "Rcpt", "Data", "EndOfHeaders", "EndOfMessage"]
    # Straight from RCPT to EOM (an MTA without DATA/header events).
    evs = events(conn, MAIL + RCPT + EOM)
    assert kinds(evs) == ["Mail", "Rcpt", "EndOfMessage"]
    assert conn.state is State.SESSION


def test_eom_may_carry_a_last_body_chunk() -> None:
    conn = milter()
    evs = events(conn, MAIL + RCPT + frame("E", b"tail\r\n"))
    assert evs[-1] == EndOfMessage(b"tail\r\n")


# --- libmilter tolerance -------------------------------------------------------------


@pytest.mark.parametrize(
    "prefix",
    [b"", CONN, CONN + HELO, CONN + MAIL, CONN + MAIL + RCPT, CONN + TO_BODY],
    ids=["connect", "session", "helo", "mail", "rcpt", "body"],
)
@pytest.mark.parametrize("stage", list("CHMRTLNBEUA"))
def test_empty_and_disabled_stage_macro_packets_are_silent(prefix: bytes, stage: str) -> None:
    conn = milter(connect=False)
    events(conn, prefix)
    state, snapshot = conn.state, conn.macros.snapshot()
    assert events(conn, macro_frame(stage)) == []
    assert conn.state is state
    assert conn.owed is None
    assert conn.macros.snapshot() == snapshot


@pytest.mark.parametrize("stage", ["L", "B", "U", "A", "Q", "K", "Z", "\x00"])
def test_macro_packets_for_codes_without_a_stage_are_ignored(stage: str) -> None:
    # Postfix sends D L before each header and D B before each body chunk with
    # the EOH/EOM lists; libmilter stores D only for C H M R T N E.
    conn = milter()
    events(conn, MAIL)
    wire = frame("D", stage.encode("latin-1") + b"i\0QID\0{x}\0y\0")
    assert events(conn, wire) == []
    assert conn.macros.get(b"i") is None
    assert conn.macros.get(b"x") is None
    # Not even validated: an ignored packet may be malformed.
    assert events(conn, frame("D", stage.encode("latin-1") + b"odd")) == []


def test_empty_macro_packet_replaces_the_stage_set() -> None:
    conn = milter()
    events(conn, macro_frame("M", (b"i", b"Q1")))
    assert conn.macros.get(b"i") == b"Q1"
    events(conn, macro_frame("M"))
    assert conn.macros.get(b"i") is None


def test_macro_packet_without_a_code_byte() -> None:
    conn = milter()
    conn.receive_data(frame("D"))
    with pytest.raises(RemoteProtocolError, match=r"MACRO \('D'\): missing the command code"):
        conn.next_event()


@pytest.mark.parametrize("payload", [b"Mi", b"Mi\0", b"Mi\0v\0j\0", b"M\0"])
def test_malformed_macro_pairs(payload: bytes) -> None:
    conn = milter()
    conn.receive_data(frame("D", payload))
    with pytest.raises(RemoteProtocolError, match=r"MACRO \('D'\) for 'M'"):
        conn.next_event()


def test_repeated_abort_gives_one_event() -> None:
    conn = milter()
    evs = events(conn, MAIL + RCPT + ABRT + ABRT + ABRT)
    assert evs == [Mail((b"<a@b>",)), Rcpt((b"<c@d>",)), ABORT]
    assert conn.state is State.SESSION
    assert not conn.in_message


def test_abort_after_end_of_message_is_silent() -> None:
    conn = milter()
    evs = events(conn, TO_BODY + EOM + ABRT + ABRT)
    assert kinds(evs)[-1] == "EndOfMessage"
    assert conn.state is State.SESSION


@pytest.mark.parametrize("prefix", [b"", CONN, CONN + HELO], ids=["connect", "session", "helo"])
def test_abort_outside_a_message_is_silent(prefix: bytes) -> None:
    conn = milter(connect=False)
    events(conn, prefix)
    state = conn.state
    assert events(conn, ABRT) == []
    assert conn.state is state


def test_abort_with_payload_is_malformed() -> None:
    conn = milter()
    conn.receive_data(frame("A", b"x"))
    with pytest.raises(RemoteProtocolError, match=r"ABORT \('A'\): expected no data"):
        conn.next_event()


def test_quit_new_connection_then_connect_without_renegotiation() -> None:
    conn = milter(Actions.ADD_HEADER, P.NOREPLY_HEADER)
    negotiated = conn.negotiated
    events(conn, macro_frame("H", (b"{tls_version}", b"TLSv1.3")) + HELO)
    events(conn, TO_BODY + EOM)
    assert conn.macros.get(b"tls_version") == b"TLSv1.3"
    assert events(conn, QNC) == [QUIT_NEW_CONNECTION]
    assert conn.owed is None
    assert conn.macros.snapshot() == {}
    assert conn.state is State.CONNECT
    # A new connection on the same socket: C, no O.
    evs = events(conn, macro_frame("C", (b"j", b"mx")) + CONN, reply=None)
    assert evs == [Connect(b"client.example", AddressFamily.INET, 25, b"192.0.2.1")]
    assert conn.owed == ord("C")
    assert conn.negotiated is negotiated
    assert conn.macros.get(b"j") == b"mx"


def test_quit_new_connection_inside_a_message() -> None:
    conn = milter()
    evs = events(conn, MAIL + RCPT + QNC)
    assert evs[-2:] == [ABORT, QUIT_NEW_CONNECTION]
    assert conn.state is State.CONNECT
    assert conn.macros.snapshot() == {}


def test_mail_inside_a_message_aborts_it_first() -> None:
    conn = milter()
    events(conn, macro_frame("M", (b"i", b"Q1"), (b"{mail_addr}", b"a@b")) + MAIL)
    events(conn, macro_frame("R", (b"{rcpt_addr}", b"c@d")) + RCPT)
    evs = events(conn, macro_frame("M", (b"i", b"Q2")) + MAIL2, reply=None)
    assert evs == [ABORT, Mail((b"<x@y>", b"SIZE=10"))]
    assert conn.owed == ord("M")
    assert conn.state is State.MAIL
    # The new MAIL sees its own macros; the old recipient's are gone.
    assert conn.macros.get(b"i") == b"Q2"
    assert conn.macros.get(b"mail_addr") is None
    assert conn.macros.get(b"rcpt_addr") is None


def test_mail_inside_a_message_pending_event_owes_its_reply() -> None:
    conn = milter()
    events(conn, MAIL + RCPT + DATA)
    conn.receive_data(MAIL2)
    assert conn.next_event() == ABORT
    assert conn.owed is None
    assert conn.next_event() == Mail((b"<x@y>", b"SIZE=10"))
    assert conn.owed == ord("M")


def test_helo_inside_a_message_aborts_it_first() -> None:
    conn = milter()
    events(conn, macro_frame("M", (b"i", b"Q1")) + MAIL + RCPT)
    evs = events(conn, macro_frame("H", (b"{cipher}", b"x")) + HELO)
    assert evs == [ABORT, Helo(b"client.example")]
    assert conn.state is State.SESSION
    assert conn.macros.get(b"i") is None
    assert conn.macros.get(b"cipher") == b"x"


def test_quit_inside_a_message_aborts_it_first() -> None:
    conn = milter()
    evs = events(conn, macro_frame("M", (b"i", b"Q1")) + MAIL + RCPT + QUIT_)
    assert evs[-2:] == [ABORT, QUIT]
    assert isinstance(evs[-2], Abort) and isinstance(evs[-1], Quit)
    assert conn.state is State.CLOSED
    assert conn.macros.snapshot() == {}


def test_quit_between_messages() -> None:
    conn = milter()
    events(conn, macro_frame("C", (b"j", b"mx")))
    evs = events(conn, TO_BODY + EOM + QUIT_)
    assert evs[-2:] == [EndOfMessage(), QUIT]
    assert isinstance(evs[-1], Quit) and not isinstance(evs[-2], Abort)
    assert conn.macros.snapshot() == {}


@pytest.mark.parametrize(
    "prefix",
    [b"", CONN, CONN + MAIL, CONN + MAIL + RCPT, CONN + TO_BODY],
    ids=["before-connect", "session", "mail", "rcpt", "body"],
)
def test_unknown_command_anywhere_after_negotiation(prefix: bytes) -> None:
    conn = milter(connect=False)
    events(conn, prefix)
    state = conn.state
    assert events(conn, UNK, reply=None) == [Unknown(b"HELP")]
    assert conn.owed == ord("U")
    conn.send(REJECT)
    # U never moves the state, whatever the reply.
    assert conn.state is state


def test_quit_new_connection_before_connect_is_accepted() -> None:
    conn = milter(connect=False)
    assert events(conn, QNC) == [QUIT_NEW_CONNECTION]
    assert conn.state is State.CONNECT


# --- which reply each command owes ---------------------------------------------------

REPLYING = {
    "C": (b"", CONN, P.NOREPLY_CONNECT),
    "H": (CONN, HELO, P.NOREPLY_HELO),
    "M": (CONN, MAIL, P.NOREPLY_MAIL),
    "R": (CONN + MAIL, RCPT, P.NOREPLY_RCPT),
    "T": (CONN + MAIL + RCPT, DATA, P.NOREPLY_DATA),
    "L": (CONN + MAIL + RCPT + DATA, HDR, P.NOREPLY_HEADER),
    "N": (CONN + MAIL + RCPT + DATA, EOH, P.NOREPLY_EOH),
    "B": (CONN + MAIL + RCPT + DATA + EOH, BODY, P.NOREPLY_BODY),
    "U": (CONN, UNK, P.NOREPLY_UNKNOWN),
}


@pytest.mark.parametrize("code", list(REPLYING))
@pytest.mark.parametrize("noreply", [False, True], ids=["replies", "noreply"])
def test_owed_reply_per_command(code: str, noreply: bool) -> None:
    prefix, wire, flag = REPLYING[code]
    conn = milter(opts=flag if noreply else P.NONE, connect=False)
    events(conn, prefix)
    events(conn, wire, reply=None)
    assert conn.owed == (None if noreply else ord(code))
    if noreply:
        with pytest.raises(LocalProtocolError, match="no reply is owed"):
            conn.send(CONTINUE)


@pytest.mark.parametrize(
    "opts",
    [P.NONE, P(0x000FF000) | P.NOREPLY_HEADER],
    ids=["none", "every-noreply"],
)
def test_eom_always_owes_a_reply(opts: ProtocolOpts) -> None:
    conn = milter(opts=opts)
    events(conn, TO_BODY)
    events(conn, EOM, reply=None)
    assert conn.owed == ord("E")


@pytest.mark.parametrize(
    ("prefix", "wire"),
    [
        (CONN + MAIL, macro_frame("R", (b"x", b"y"))),
        (CONN + MAIL, ABRT),
        (CONN, QUIT_),
        (CONN, QNC),
    ],
    ids=["D", "A", "Q", "K"],
)
def test_commands_that_never_owe_a_reply(prefix: bytes, wire: bytes) -> None:
    conn = milter(connect=False)
    events(conn, prefix)
    events(conn, wire, reply=None)
    assert conn.owed is None


def test_every_noreply_session_needs_no_sends() -> None:
    nr = P(0x000FF000) | P.NOREPLY_HEADER
    conn = milter(opts=nr, connect=False)
    evs = events(conn, CONN + HELO + MAIL + RCPT + DATA + HDR + EOH + BODY + UNK, reply=None)
    assert len(evs) == 9
    assert conn.owed is None


def test_faked_noreply_stages_still_owe_on_the_wire() -> None:
    # An MTA that does not offer NR_* (Postfix milter_protocol=2): libmilter fakes it.
    offer = OptionNegotiation(2, Actions(0x3F), P(0x7F))
    conn = milter(opts=P.NOREPLY_HEADER | P.NOREPLY_CONNECT, offer=offer, connect=False)
    assert conn.negotiated is not None
    assert conn.negotiated.opts == P.NONE
    assert conn.negotiated.faked_noreply == P.NOREPLY_HEADER | P.NOREPLY_CONNECT
    events(conn, CONN, reply=None)
    assert conn.owed == ord("C")


def test_send_with_nothing_owed() -> None:
    conn = milter()
    with pytest.raises(LocalProtocolError, match=r"CONTINUE \('c'\): no reply is owed now"):
        conn.send(CONTINUE)


# --- replies valid per stage (protocol.md §6) ----------------------------------------

# Written out from the table in protocol.md §6 (SHUTDOWN '4' is accepted by
# Postfix at every stage).
FINALS = {
    "C": "carty4",
    "H": "carty4",
    "M": "cartdy4",
    "R": "cartdy4",
    "T": "cartdy4",
    "L": "cartdy4",
    "N": "cartdy4",
    "B": "cartdy4",
    "E": "cartdy4",
    "U": "crty4",
}
PREFIX_OF = {
    "C": b"",
    "H": CONN,
    "M": CONN,
    "R": CONN + MAIL,
    "T": CONN + MAIL + RCPT,
    "L": CONN + MAIL + RCPT + DATA,
    "N": CONN + MAIL + RCPT + DATA + HDR,
    "B": CONN + MAIL + RCPT + DATA + HDR + EOH,
    "E": CONN + TO_BODY,
    "U": CONN,
}
WIRE_OF = {
    "C": CONN,
    "H": HELO,
    "M": MAIL,
    "R": RCPT,
    "T": DATA,
    "L": HDR,
    "N": EOH,
    "B": BODY,
    "E": EOM,
    "U": UNK,
}
REPLY_OF: dict[str, Reply] = {
    "c": CONTINUE,
    "a": ACCEPT,
    "r": REJECT,
    "t": TEMPFAIL,
    "d": DISCARD,
    "y": ReplyWithCode(b"550 5.7.1 no"),
    "4": SHUTDOWN,
    "s": SKIP,
    "p": PROGRESS,
    "h": AddHeader(b"X", b"1"),
    "O": OptionNegotiationReply(6, A.NONE, P.NONE),
}


ALL_ACTIONS = ALL_ACTIONS


def at(stage: str, actions: Actions = ALL_ACTIONS, opts: ProtocolOpts = P.SKIP) -> MilterConnection:
    """A milter connection that owes the reply to ``stage`` (a command code)."""
    conn = milter(actions, opts, connect=False)
    events(conn, PREFIX_OF[stage])
    events(conn, WIRE_OF[stage], reply=None)
    assert conn.owed == ord(stage)
    return conn


@pytest.mark.parametrize("stage", list(FINALS))
@pytest.mark.parametrize("reply", list("cartdy4O"))
def test_final_replies_per_stage(stage: str, reply: str) -> None:
    conn = at(stage)
    if reply in FINALS[stage]:
        wire = conn.send(REPLY_OF[reply])
        assert wire == REPLY_OF[reply].encode()
        assert conn.owed is None
    else:
        with pytest.raises(LocalProtocolError, match=r"is not a valid reply to|no option"):
            conn.send(REPLY_OF[reply])
        assert conn.owed == ord(stage)


@pytest.mark.parametrize("stage", [s for s in FINALS if s != "B"])
def test_skip_only_at_body(stage: str) -> None:
    conn = at(stage)
    with pytest.raises(LocalProtocolError, match=r"SKIP \('s'\) is not a valid reply"):
        conn.send(SKIP)


def test_skip_at_body_only_if_negotiated() -> None:
    assert at("B", opts=P.SKIP).send(SKIP) == frame("s")
    conn = at("B", opts=P.NONE)
    with pytest.raises(LocalProtocolError, match="SKIP was not negotiated"):
        conn.send(SKIP)
    assert conn.owed == ord("B")


def test_skip_keeps_the_message_going() -> None:
    conn = at("B", opts=P.SKIP)
    conn.send(SKIP)
    assert conn.state is State.BODY
    assert events(conn, EOM, reply=None) == [EndOfMessage()]


@pytest.mark.parametrize("stage", ["C", "H"])
def test_discard_not_at_connect_or_helo(stage: str) -> None:
    with pytest.raises(LocalProtocolError, match=r"DISCARD \('d'\) is not a valid reply"):
        at(stage).send(DISCARD)


@pytest.mark.parametrize("reply", [ACCEPT, DISCARD])
def test_unknown_cannot_accept_or_discard(reply: Reply) -> None:
    with pytest.raises(LocalProtocolError, match="is not a valid reply to UNKNOWN"):
        at("U").send(reply)


MODIFICATIONS: list[tuple[Reply, Actions]] = [
    (AddHeader(b"X-A", b"1"), A.ADD_HEADER),
    (InsertHeader(0, b"X-A", b"1"), A.ADD_HEADER),
    (ChangeHeader(1, b"Subject", b""), A.REPLACE_HEADER),
    (AddRecipient(b"<n@x>"), A.ADD_RECIPIENT),
    (AddRecipientExt(b"<n@x>", b"NOTIFY=NEVER"), A.ADD_RECIPIENT_EXT),
    (DeleteRecipient(b"<c@d>"), A.REMOVE_RECIPIENT),
    (ChangeSender(b"<s@x>"), A.REPLACE_SENDER),
    (ReplaceBody(b"new"), A.REPLACE_BODY),
    (Quarantine(b"why"), A.QUARANTINE),
]
MOD_IDS = [chr(m.code) for m, _ in MODIFICATIONS]


@pytest.mark.parametrize(("reply", "action"), MODIFICATIONS, ids=MOD_IDS)
def test_modification_at_eom_with_its_action(reply: Reply, action: Actions) -> None:
    conn = at("E", actions=action)
    assert conn.send(reply) == reply.encode()
    assert conn.owed == ord("E")  # still waiting for the final reply
    assert conn.send(CONTINUE) == frame("c")
    assert conn.owed is None
    assert conn.state is State.SESSION


@pytest.mark.parametrize(("reply", "action"), MODIFICATIONS, ids=MOD_IDS)
def test_modification_without_its_action(reply: Reply, action: Actions) -> None:
    conn = at("E", actions=ALL_ACTIONS & ~action)
    with pytest.raises(LocalProtocolError, match=r"needs the .* action, which was not negotiated"):
        conn.send(reply)
    assert conn.owed == ord("E")


@pytest.mark.parametrize(("reply", "action"), MODIFICATIONS, ids=MOD_IDS)
@pytest.mark.parametrize("stage", ["C", "M", "R", "L", "B"])
def test_modification_only_at_eom(reply: Reply, action: Actions, stage: str) -> None:
    conn = at(stage, actions=action)
    with pytest.raises(LocalProtocolError, match="is not a valid reply to"):
        conn.send(reply)


def test_progress_at_eom_any_number_of_times() -> None:
    conn = at("E", actions=A.NONE)
    for _ in range(5):
        assert conn.send(PROGRESS) == frame("p")
        assert conn.owed == ord("E")
    conn.send(ACCEPT)
    assert conn.owed is None


@pytest.mark.parametrize("stage", ["M", "B"])
def test_progress_not_before_eom(stage: str) -> None:
    with pytest.raises(LocalProtocolError, match=r"PROGRESS \('p'\) is not a valid reply"):
        at(stage).send(PROGRESS)


def test_replace_body_chunks_must_be_contiguous() -> None:
    conn = at("E")
    conn.send(ReplaceBody(b"a"))
    conn.send(ReplaceBody(b"b"))
    conn.send(AddHeader(b"X", b"1"))
    with pytest.raises(LocalProtocolError, match="must be contiguous"):
        conn.send(ReplaceBody(b"c"))
    conn.send(CONTINUE)


def test_replace_body_may_follow_other_changes_and_progress() -> None:
    conn = at("E")
    conn.send(AddHeader(b"X", b"1"))
    conn.send(ReplaceBody(b"a"))
    conn.send(PROGRESS)
    conn.send(ReplaceBody(b"b"))
    conn.send(CONTINUE)
    # The run restarts with the next message.
    events(conn, TO_BODY)
    events(conn, EOM, reply=None)
    conn.send(ReplaceBody(b"a"))
    conn.send(ChangeHeader(1, b"X", b""))
    with pytest.raises(LocalProtocolError, match="must be contiguous"):
        conn.send(ReplaceBody(b"b"))


def test_unencodable_reply_leaves_the_state_alone() -> None:
    conn = at("M")
    with pytest.raises(LocalProtocolError, match=r"cannot be encoded.*NUL"):
        conn.send(ReplyWithCode(b"550 bad\0text"))
    assert conn.owed == ord("M")
    assert conn.state is State.MAIL
    conn = at("E")
    with pytest.raises(LocalProtocolError, match="cannot be encoded"):
        conn.send(InsertHeader(-1, b"X", b"v"))
    with pytest.raises(LocalProtocolError, match="cannot be encoded"):
        conn.send(ChangeHeader(2**32, b"X", b"v"))
    assert conn.owed == ord("E")
    assert conn.send(CONTINUE) == frame("c")


# --- reply-driven resets -------------------------------------------------------------

ENDING: list[Reply] = [
    ACCEPT,
    REJECT,
    TEMPFAIL,
    DISCARD,
    ReplyWithCode(b"451 4.7.1 later"),
    SHUTDOWN,
]
ENDING_IDS = [chr(r.code) for r in ENDING]


@pytest.mark.parametrize("reply", ENDING, ids=ENDING_IDS)
@pytest.mark.parametrize("stage", ["M", "T", "L", "N", "B"])
def test_deciding_reply_ends_the_message(reply: Reply, stage: str) -> None:
    conn = at(stage)
    conn.send(reply)
    assert conn.state is State.SESSION
    assert not conn.in_message


@pytest.mark.parametrize("reply", ENDING, ids=ENDING_IDS)
def test_after_reject_at_mail_rcpt_is_an_error(reply: Reply) -> None:
    conn = at("M")
    conn.send(reply)
    conn.receive_data(RCPT)
    with pytest.raises(RemoteProtocolError, match=unexpected("RCPT", State.SESSION, "MAIL")):
        conn.next_event()


def test_after_reject_at_mail_a_new_mail_needs_no_abort() -> None:
    conn = at("M")
    conn.send(REJECT)
    assert events(conn, MAIL2, reply=None) == [Mail((b"<x@y>", b"SIZE=10"))]
    assert conn.state is State.MAIL


@pytest.mark.parametrize(
    "reply",
    [REJECT, TEMPFAIL, DISCARD, ReplyWithCode(b"550 5.1.1 no such user"), SHUTDOWN],
    ids=["r", "t", "d", "y", "4"],
)
def test_recipient_level_replies_keep_the_message(reply: Reply) -> None:
    conn = at("R")
    conn.send(reply)
    assert conn.state is State.RCPT
    assert conn.in_message
    assert events(conn, RCPT + DATA) == [Rcpt((b"<c@d>",)), DATA_COMMAND]


def test_accept_at_rcpt_ends_the_message() -> None:
    conn = at("R")
    conn.send(ACCEPT)
    assert conn.state is State.SESSION
    conn.receive_data(DATA)
    with pytest.raises(RemoteProtocolError, match=unexpected("DATA", State.SESSION, "MAIL")):
        conn.next_event()


@pytest.mark.parametrize("reply", [ACCEPT, REJECT, TEMPFAIL, SHUTDOWN], ids=list("art4"))
@pytest.mark.parametrize("stage", ["C", "H"])
def test_connection_level_replies_do_not_move_the_state(reply: Reply, stage: str) -> None:
    conn = at(stage)
    conn.send(reply)
    assert conn.state is State.SESSION


@pytest.mark.parametrize("reply", [CONTINUE, REJECT, TEMPFAIL, DISCARD, ACCEPT], ids=list("crtda"))
def test_final_reply_to_eom_ends_the_message(reply: Reply) -> None:
    conn = at("E")
    conn.send(reply)
    assert conn.state is State.SESSION
    assert events(conn, ABRT) == []


def test_unknown_reply_inside_a_message_keeps_it() -> None:
    conn = milter()
    events(conn, MAIL + RCPT)
    events(conn, UNK, reply=None)
    conn.send(REJECT)
    assert conn.state is State.RCPT


# --- macros ---------------------------------------------------------------------------


def test_per_message_reset_on_abort() -> None:
    conn = milter(connect=False)
    events(conn, macro_frame("C", (b"j", b"mx"), (b"_", b"client [192.0.2.1]")) + CONN)
    events(conn, macro_frame("H", (b"{tls_version}", b"TLSv1.3")) + HELO)
    events(conn, macro_frame("M", (b"i", b"Q1"), (b"{mail_addr}", b"a@b")) + MAIL)
    events(conn, macro_frame("R", (b"{rcpt_addr}", b"c@d")) + RCPT)
    events(conn, macro_frame("T", (b"i", b"Q1")) + DATA)
    events(conn, macro_frame("N", (b"{eoh}", b"1")) + EOH)
    assert set(conn.macros.snapshot()) == {
        b"j",
        b"_",
        b"tls_version",
        b"i",
        b"mail_addr",
        b"rcpt_addr",
        b"eoh",
    }
    assert events(conn, ABRT) == [ABORT]
    assert conn.macros.snapshot() == {
        b"j": b"mx",
        b"_": b"client [192.0.2.1]",
        b"tls_version": b"TLSv1.3",
    }


def test_per_message_reset_after_eom() -> None:
    conn = milter()
    events(conn, macro_frame("C", (b"j", b"mx")))
    events(conn, macro_frame("M", (b"i", b"Q1")) + MAIL + RCPT)
    events(conn, macro_frame("E", (b"{msg_id}", b"<id@x>")) + EOM, reply=None)
    assert conn.macros.get(b"msg_id") == b"<id@x>"
    assert conn.macros.get(b"i") == b"Q1"
    conn.send(CONTINUE)
    assert conn.macros.snapshot() == {b"j": b"mx"}


def test_macros_cleared_when_a_reply_ends_the_message() -> None:
    conn = milter()
    events(conn, macro_frame("M", (b"i", b"Q1")) + MAIL, reply=None)
    conn.send(REJECT)
    assert conn.macros.get(b"i") is None


def test_new_macro_packet_replaces_the_stage_set() -> None:
    conn = milter()
    events(conn, macro_frame("M", (b"i", b"Q1"), (b"{auth_type}", b"PLAIN")))
    events(conn, macro_frame("M", (b"i", b"Q2")))
    assert conn.macros.get(b"i") == b"Q2"
    assert conn.macros.get(b"auth_type") is None


@pytest.mark.parametrize(
    ("command", "kept"),
    [
        (CONN, {b"c"}),
        (HELO, {b"c", b"h"}),
        (MAIL, {b"c", b"h", b"m"}),
    ],
    ids=["C", "H", "M"],
)
def test_scoping_commands_clear_later_stages(command: bytes, kept: set[bytes]) -> None:
    conn = milter(connect=command is not CONN)
    for stage in "CHMRTNE":
        events(conn, macro_frame(stage, (stage.lower().encode(), b"1")))
    assert len(conn.macros.snapshot()) == 7
    events(conn, command)
    assert set(conn.macros.snapshot()) == kept


def test_rcpt_clears_later_stages_but_keeps_its_own() -> None:
    conn = milter()
    events(conn, MAIL)
    for stage in "RTNE":
        events(conn, macro_frame(stage, (stage.lower().encode(), b"1")))
    events(conn, RCPT)
    assert set(conn.macros.snapshot()) == {b"r"}


def test_rcpt_macros_are_per_recipient() -> None:
    conn = milter()
    events(conn, MAIL)
    events(conn, macro_frame("R", (b"{rcpt_addr}", b"c@d"), (b"{rcpt_mailer}", b"smtp")) + RCPT)
    assert conn.macros.get(b"rcpt_mailer") == b"smtp"
    events(conn, macro_frame("R", (b"{rcpt_addr}", b"e@f")) + RCPT)
    assert conn.macros.get(b"rcpt_addr") == b"e@f"
    assert conn.macros.get(b"rcpt_mailer") is None


def test_lookup_searches_the_latest_stage_first() -> None:
    conn = milter(connect=False)
    events(conn, macro_frame("C", (b"x", b"connect")) + CONN)
    events(conn, macro_frame("M", (b"x", b"mail")) + MAIL)
    assert conn.macros.get(b"x") == b"mail"
    events(conn, macro_frame("R", (b"x", b"rcpt")) + RCPT)
    events(conn, macro_frame("T", (b"x", b"data")) + DATA)
    events(conn, macro_frame("N", (b"x", b"eoh")) + EOH)
    assert conn.macros.get(b"x") == b"eoh"
    events(conn, macro_frame("E", (b"x", b"eom")))
    assert conn.macros.get(b"x") == b"eom"
    # EOH is stored before EOM although its wire stage number (6) is higher.
    assert conn.macros.snapshot()[b"x"] == b"eom"
    events(conn, ABRT)
    assert conn.macros.get(b"x") == b"connect"


@pytest.mark.parametrize(
    ("defined", "asked"),
    [(b"i", b"{i}"), (b"{i}", b"i"), (b"i", b"i"), (b"{i}", b"{i}")],
)
def test_braced_and_bare_names_are_the_same_macro(defined: bytes, asked: bytes) -> None:
    conn = milter()
    events(conn, macro_frame("M", (defined, b"QID")))
    assert conn.macros.get(asked) == b"QID"
    assert conn.macros.snapshot() == {b"i": b"QID"}


def test_macro_values_are_raw_bytes() -> None:
    conn = milter()
    utf8 = "jürgen@bücher.example".encode()
    events(conn, macro_frame("M", (b"{auth_authen}", utf8), (b"{bad}", b"\xff\xfe")))
    assert conn.macros.get(b"{auth_authen}") == utf8
    assert conn.macros.get(b"bad") == b"\xff\xfe"
    assert conn.macros.get(b"missing") is None


def test_quit_clears_all_macros() -> None:
    conn = milter()
    events(conn, macro_frame("C", (b"j", b"mx")) + macro_frame("H", (b"h", b"1")))
    events(conn, QUIT_)
    assert conn.macros.snapshot() == {}


# --- negotiation (protocol.md §4) --------------------------------------------------------


@pytest.mark.parametrize(("offered", "agreed"), [(2, 2), (3, 3), (6, 6), (7, 6), (2**32 - 1, 6)])
def test_version_is_the_lower_one(offered: int, agreed: int) -> None:
    offer = OptionNegotiation(offered, ALL_ACTIONS, ALL_PROTOCOL_OPTS)
    assert negotiate(offer, A.NONE, P.NONE).version == agreed


@pytest.mark.parametrize("version", [0, 1])
def test_version_below_2_fails(version: int) -> None:
    offer = OptionNegotiation(version, ALL_ACTIONS, ALL_PROTOCOL_OPTS)
    with pytest.raises(NegotiationError, match=f"version {version} is below 2"):
        negotiate(offer, A.NONE, P.NONE)
    with pytest.raises(NegotiationError):
        negotiate_all(offer, P.NONE)


def test_zero_offers_mean_v1_actions_and_v2_steps() -> None:
    offer = OptionNegotiation(6, A.NONE, P.NONE)
    agreed = negotiate(offer, A(0x0F), P(0x3F))
    assert agreed.actions == 0x0F and agreed.opts == 0x3F
    with pytest.raises(NegotiationError, match="actions"):
        negotiate(offer, A.QUARANTINE, P.NONE)
    with pytest.raises(NegotiationError, match="protocol steps"):
        negotiate(offer, A.NONE, P.NO_EOH)
    assert negotiate_all(offer, P.NONE).actions == 0x0F


def test_unoffered_noreply_steps_are_dropped_and_faked() -> None:
    offer = OptionNegotiation(2, A(0x3F), P(0x7F))
    agreed = negotiate(offer, A.NONE, P.NO_BODY | P.NOREPLY_HEADER | P.NOREPLY_RCPT)
    assert agreed.opts == P.NO_BODY
    assert agreed.faked_noreply == P.NOREPLY_HEADER | P.NOREPLY_RCPT
    assert agreed.reply().encode() == frame("O", bytes.fromhex("00000002 00000000 00000010"))


def test_offered_noreply_steps_are_kept() -> None:
    agreed = negotiate(POSTFIX_OFFER, A.NONE, P.NOREPLY_HEADER)
    assert agreed.opts == P.NOREPLY_HEADER
    assert agreed.faked_noreply == P.NONE


def test_unoffered_no_data_and_no_unknown_are_dropped() -> None:
    offer = OptionNegotiation(2, A(0x3F), P(0x7F))
    agreed = negotiate(offer, A.NONE, P.NO_DATA | P.NO_UNKNOWN | P.NO_HELO)
    assert agreed.opts == P.NO_HELO
    assert agreed.faked_noreply == P.NONE


@pytest.mark.parametrize(
    "step", [P.SKIP, P.HEADER_LEADING_SPACE, P.REJECTED_RCPT], ids=lambda s: s.name
)
def test_other_unoffered_steps_fail(step: ProtocolOpts) -> None:
    offer = OptionNegotiation(2, A(0x3F), P(0x7F))
    with pytest.raises(NegotiationError, match="protocol steps"):
        negotiate(offer, A.NONE, step)


@pytest.mark.parametrize(
    "action", [A.REPLACE_SENDER, A.ADD_RECIPIENT_EXT, A.REQUEST_MACROS], ids=lambda a: a.name
)
def test_unoffered_actions_fail(action: Actions) -> None:
    offer = OptionNegotiation(2, A(0x3F), P(0x7F))
    with pytest.raises(NegotiationError, match="does not offer the actions"):
        negotiate(offer, action, P.NONE)


def test_internal_bits_are_never_sent() -> None:
    agreed = negotiate(POSTFIX_OFFER, A.NONE, P.MDS_256K | P.MDS_1M | P.NO_HELO)
    assert agreed.opts == P.NO_HELO


def test_negotiate_all() -> None:
    unhandled = P.NO_HELO | P.NO_BODY | P.NOREPLY_HEADER | P.REJECTED_RCPT | P.SKIP
    agreed = negotiate_all(POSTFIX_OFFER, unhandled)
    assert agreed.actions == 0x1FF
    # The derived NO_* bits plus SKIP because it is offered; never NR_* or RCPT_REJ.
    assert agreed.opts == P.NO_HELO | P.NO_BODY | P.SKIP
    assert agreed.version == 6


def test_negotiate_all_with_an_old_mta() -> None:
    offer = OptionNegotiation(2, A(0x3F), P(0x7F))
    agreed = negotiate_all(offer, P.NO_DATA | P.NO_UNKNOWN | P.NO_MAIL, {MacroStage.MAIL: b"i"})
    assert agreed.actions == 0x3F
    assert agreed.opts == P.NO_MAIL  # no SKIP offered; NO_DATA/NO_UNKNOWN dropped
    assert dict(agreed.macros) == {MacroStage.MAIL: b"i"}


def test_check_reply_accepts_a_fitting_reply() -> None:
    reply = OptionNegotiationReply(
        6,
        A.ADD_HEADER | A.REQUEST_MACROS,
        P.NO_BODY | P.MDS_256K,
        ((MacroStage.CONNECT, b"j"), (MacroStage.EOM, b"{msg_id}")),
    )
    agreed = check_reply(POSTFIX_OFFER, reply)
    assert agreed.version == 6
    assert agreed.actions == A.ADD_HEADER | A.REQUEST_MACROS
    assert agreed.opts == P.NO_BODY  # MTA-internal bits stripped
    assert dict(agreed.macros) == {MacroStage.CONNECT: b"j", MacroStage.EOM: b"{msg_id}"}


@pytest.mark.parametrize(
    ("offer", "reply", "message"),
    [
        (POSTFIX_OFFER, OptionNegotiationReply(7, A.NONE, P.NONE), "version 7"),
        (POSTFIX_OFFER, OptionNegotiationReply(1, A.NONE, P.NONE), "version 1"),
        (
            OptionNegotiation(2, A(0x3F), P(0x7F)),
            OptionNegotiationReply(2, A.REPLACE_SENDER, P.NONE),
            "actions not offered",
        ),
        (
            OptionNegotiation(2, A(0x3F), P(0x7F)),
            OptionNegotiationReply(2, A.NONE, P.SKIP),
            "protocol steps not offered",
        ),
        (
            POSTFIX_OFFER,
            OptionNegotiationReply(
                6, A.NONE, P.NONE, ((MacroStage.MAIL, b"i"), (MacroStage.MAIL, b"j"))
            ),
            "two macro lists for stage MAIL",
        ),
    ],
    ids=["version-high", "version-low", "action", "step", "macro-twice"],
)
def test_check_reply_refuses(
    offer: OptionNegotiation, reply: OptionNegotiationReply, message: str
) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        check_reply(offer, reply)


def test_send_of_an_unfitting_negotiation_reply_is_local() -> None:
    conn = MilterConnection()
    one_event(conn, OptionNegotiation(2, A(0x3F), P(0x7F)).encode())
    with pytest.raises(LocalProtocolError, match="version 6 does not fit the offered 2"):
        conn.send(OptionNegotiationReply(6, A.NONE, P.NONE))
    assert conn.owed == ord("O")
    assert conn.send(OptionNegotiationReply(2, A.NONE, P.NONE)) == frame(
        "O", bytes.fromhex("00000002 00000000 00000000")
    )
    assert conn.state is State.CONNECT


def test_accept_negotiation_when_none_is_waiting() -> None:
    conn = milter()
    with pytest.raises(LocalProtocolError, match="no option negotiation is waiting"):
        conn.accept_negotiation(negotiate(POSTFIX_OFFER, A.NONE, P.NONE))


def test_accept_negotiation_returns_the_reply_bytes_and_keeps_faked_noreply() -> None:
    conn = MilterConnection()
    offer = one_event(conn, OptionNegotiation(3, ALL_ACTIONS, P(0x17F)).encode())
    assert isinstance(offer, OptionNegotiation)
    agreed = negotiate(offer, A.ADD_HEADER, P.NOREPLY_HEADER | P.NO_UNKNOWN)
    wire = conn.accept_negotiation(agreed)
    assert wire == frame("O", bytes.fromhex("00000003 00000001 00000100"))
    assert conn.negotiated is agreed
    assert conn.negotiated.faked_noreply == P.NOREPLY_HEADER


def test_no_connect_starts_the_session_without_connect() -> None:
    conn = milter(opts=P.NO_CONNECT)
    assert conn.state is State.SESSION
    evs = events(conn, HELO + MAIL + RCPT + EOM + QNC)
    assert kinds(evs) == ["Helo", "Mail", "Rcpt", "EndOfMessage", "QuitNewConnection"]
    # After K the next connection starts without C as well.
    assert conn.state is State.SESSION
    conn.receive_data(CONN)
    with pytest.raises(RemoteProtocolError, match=r"unexpected CONNECT"):
        conn.next_event()


def test_disabled_stages_are_skipped_over() -> None:
    # NO_MAIL: a message starts at its first RCPT; NO_RCPT|NO_DATA: MAIL -> headers.
    conn = milter(opts=P.NO_MAIL)
    evs = events(conn, RCPT + RCPT + DATA + EOM)
    assert kinds(evs) == ["Rcpt", "Rcpt", "Data", "EndOfMessage"]
    conn = milter(opts=P.NO_RCPT | P.NO_DATA)
    evs = events(conn, MAIL + HDR + EOH + EOM)
    assert kinds(evs) == ["Mail", "Header", "EndOfHeaders", "EndOfMessage"]


def test_headers_only_milter_session() -> None:
    # protocol.md §12's 0x3DF milter: headers and EOM, no header replies.
    conn = milter(A.ADD_HEADER, P(0x3DF))
    assert conn.state is State.SESSION
    # Postfix still sends the D packets of the disabled stages.
    wire = (
        macro_frame("C", (b"j", b"mx"))
        + macro_frame("H")
        + macro_frame("M", (b"i", b"Q"))
        + macro_frame("R")
        + macro_frame("T", (b"i", b"Q"))
        + macro_frame("L", (b"i", b"Q"))
        + HDR
        + macro_frame("L", (b"i", b"Q"))
        + frame("L", strings(b"From", b"a@b"))
        + macro_frame("N", (b"i", b"Q"))
        + macro_frame("B")
        + macro_frame("E", (b"i", b"Q"))
    )
    evs = events(conn, wire, reply=None)
    assert evs == [Header(b"Subject", b"hi"), Header(b"From", b"a@b")]
    assert conn.owed is None
    assert events(conn, EOM, reply=None) == [EndOfMessage()]
    assert conn.owed == ord("E")
    # The D C packet is stored although C itself is disabled (as in libmilter).
    assert conn.macros.get(b"j") == b"mx"
    assert conn.macros.get(b"i") == b"Q"
    conn.send(AddHeader(b"X-Seen", b"yes"))
    conn.send(CONTINUE)
    assert events(conn, ABRT + QUIT_) == [QUIT]


def test_disabled_command_sent_anyway_is_refused() -> None:
    # The transition table drops commands the milter disabled with NO_*.
    conn = milter(opts=P.NO_HELO)
    conn.receive_data(HELO)
    with pytest.raises(RemoteProtocolError, match=r"unexpected HELO"):
        conn.next_event()
    conn = milter(opts=P.NO_MAIL)
    events(conn, RCPT)
    conn.receive_data(MAIL)
    with pytest.raises(RemoteProtocolError, match=r"unexpected MAIL .*expected one of: (?!.*MAIL)"):
        conn.next_event()


# --- properties ----------------------------------------------------------------------


def test_connection_properties() -> None:
    conn = MilterConnection(max_data_size=1000)
    assert conn.max_data_size == 1000
    assert conn.state is State.NEGOTIATE
    assert conn.negotiated is None
    assert not conn.in_message
    conn.receive_data(OFFER[:7])
    assert conn.buffered == 7
    assert repr(conn.next_event()) == "NEED_DATA"
    conn.receive_data(OFFER[7:])
    assert isinstance(conn.next_event(), OptionNegotiation)
    assert conn.buffered == 0


def test_negotiated_record_reply() -> None:
    agreed = negotiate(POSTFIX_OFFER, A.ADD_HEADER, P.NO_BODY, {MacroStage.EOM: b"i"})
    assert agreed.reply() == OptionNegotiationReply(
        6, A.ADD_HEADER, P.NO_BODY, ((MacroStage.EOM, b"i"),)
    )


def test_quarantine_and_header_values_unchanged_through_send() -> None:
    conn = at("E")
    assert conn.send(Quarantine(b"held for review")) == frame("q", b"held for review\0")
    assert conn.send(ChangeSender(b"<s@x>", b"RET=HDRS")) == frame("e", b"<s@x>\0RET=HDRS\0")
    assert conn.send(CONTINUE) == frame("c")


# Bits beyond the defined flags (``~`` of an IntFlag only inverts defined bits).


@pytest.mark.parametrize("bits", [0x200, 0x8000_0000], ids=hex)
def test_undefined_action_bits_are_not_offered(bits: int) -> None:
    with pytest.raises(NegotiationError, match="does not offer the actions"):
        negotiate(POSTFIX_OFFER, A(bits), P.NONE)
    with pytest.raises(RemoteProtocolError, match="actions not offered"):
        check_reply(POSTFIX_OFFER, OptionNegotiationReply(6, A(bits), P.NONE))


@pytest.mark.parametrize("bits", [0x0020_0000, 0x0800_0000, 0x8000_0000], ids=hex)
def test_undefined_protocol_bits_are_not_offered(bits: int) -> None:
    with pytest.raises(NegotiationError, match="protocol steps"):
        negotiate(POSTFIX_OFFER, A.NONE, P(bits))
    with pytest.raises(RemoteProtocolError, match="protocol steps not offered"):
        check_reply(POSTFIX_OFFER, OptionNegotiationReply(6, A.NONE, P(bits)))


def test_undefined_bits_pass_when_offered() -> None:
    offer = OptionNegotiation(6, A(0x3FF), P(0x801FFFFF))
    agreed = negotiate(offer, A(0x200), P(0x8000_0000))
    assert int(agreed.actions) == 0x200
    assert int(agreed.opts) == 0x8000_0000
    assert check_reply(offer, agreed.reply()).opts == agreed.opts
