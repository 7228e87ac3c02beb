"""Byte-exact vectors: protocol.md §12, and the encoding of every command and reply.

Expected bytes are written out by hand (hex or `frame`), never produced by
the engine's encoder.
"""

from __future__ import annotations

import pytest

from triomilter.protocol import (
    ABORT,
    ACCEPT,
    CONTINUE,
    DATA,
    DISCARD,
    END_OF_HEADERS,
    PROGRESS,
    QUIT,
    QUIT_NEW_CONNECTION,
    REJECT,
    SHUTDOWN,
    SKIP,
    TEMPFAIL,
    Actions,
    AddHeader,
    AddRecipient,
    AddRecipientExt,
    AddressFamily,
    Body,
    ChangeHeader,
    ChangeSender,
    Command,
    CommandCode,
    Connect,
    Continue,
    DefineMacros,
    DeleteRecipient,
    EndOfMessage,
    Header,
    Helo,
    InsertHeader,
    MacroStage,
    Mail,
    MilterConnection,
    MtaConnection,
    OptionNegotiation,
    OptionNegotiationReply,
    ProtocolOpts,
    Quarantine,
    Rcpt,
    Reject,
    RemoteProtocolError,
    ReplaceBody,
    Reply,
    ReplyCode,
    ReplyWithCode,
    State,
    Unknown,
    decode_command,
    decode_reply,
    negotiate,
)

from ._helpers import (
    POSTFIX_OFFER,
    POSTFIX_OFFER_BYTES,
    events,
    feed_replies,
    frame,
    milter,
    mta,
    one_event,
    split_frames,
    strings,
)

P = ProtocolOpts

# protocol.md §12, vector 2: headers + EOM only, may add headers, no header replies.
HEADERS_ONLY_OPTS = (
    P.NO_CONNECT
    | P.NO_HELO
    | P.NO_MAIL
    | P.NO_RCPT
    | P.NO_BODY
    | P.NO_EOH
    | P.NO_UNKNOWN
    | P.NO_DATA
    | P.NOREPLY_HEADER
)
HEADERS_ONLY_REPLY_BYTES = bytes.fromhex("0000000D 4F 00000006 00000001 000003DF")
AUTH_AUTHEN_REQUEST = bytes.fromhex("00000002 7B617574685F61757468656E7D 00")


# --- protocol.md §12 ---------------------------------------------------------


class TestSection12:
    def test_postfix_offer_encodes_to_the_vector(self) -> None:
        assert POSTFIX_OFFER.encode() == POSTFIX_OFFER_BYTES
        conn = MtaConnection()
        assert conn.send(POSTFIX_OFFER) == POSTFIX_OFFER_BYTES
        assert conn.awaiting == ord("O")

    def test_postfix_offer_decodes_in_the_milter_role(self) -> None:
        conn = MilterConnection()
        offer = one_event(conn, POSTFIX_OFFER_BYTES)
        assert offer == OptionNegotiation(6, Actions(0x1FF), ProtocolOpts(0x1FFFFF))
        assert conn.owed == ord("O")

    def test_headers_only_reply_is_0x3df(self) -> None:
        assert int(HEADERS_ONLY_OPTS) == 0x3DF
        negotiated = negotiate(POSTFIX_OFFER, Actions.ADD_HEADER, HEADERS_ONLY_OPTS)
        assert negotiated.reply().encode() == HEADERS_ONLY_REPLY_BYTES

    def test_headers_only_reply_through_both_roles(self) -> None:
        milter_conn = MilterConnection()
        one_event(milter_conn, POSTFIX_OFFER_BYTES)
        wire = milter_conn.send(OptionNegotiationReply(6, Actions.ADD_HEADER, ProtocolOpts(0x3DF)))
        assert wire == HEADERS_ONLY_REPLY_BYTES
        # NO_CONNECT: the session starts without C.
        assert milter_conn.state is State.SESSION

        mta_conn = MtaConnection()
        assert mta_conn.send(POSTFIX_OFFER) == POSTFIX_OFFER_BYTES
        (reply,) = feed_replies(mta_conn, HEADERS_ONLY_REPLY_BYTES)
        assert reply == OptionNegotiationReply(6, Actions.ADD_HEADER, ProtocolOpts(0x3DF))
        assert mta_conn.negotiated is not None
        assert mta_conn.negotiated.opts == 0x3DF
        assert not mta_conn.expects_reply(ord("L"))
        assert mta_conn.is_disabled(ord("C"))

    def test_macro_request_appended_to_the_reply(self) -> None:
        expected = bytes.fromhex("0000001F 4F 00000006 00000001 000003DF") + AUTH_AUTHEN_REQUEST
        reply = OptionNegotiationReply(
            6, Actions.ADD_HEADER, HEADERS_ONLY_OPTS, ((MacroStage.MAIL, b"{auth_authen}"),)
        )
        assert reply.encode() == expected
        assert decode_reply(expected[4], expected[5:]) == reply
        negotiated = negotiate(
            POSTFIX_OFFER,
            Actions.ADD_HEADER,
            HEADERS_ONLY_OPTS,
            {MacroStage.MAIL: b"{auth_authen}"},
        )
        assert negotiated.reply().encode() == expected

    def test_connect_ipv4_vector(self) -> None:
        wire = (
            bytes.fromhex("00000019 43")
            + b"mx.example\0"
            + bytes.fromhex("34 C000")
            + b"192.0.2.1\0"
        )
        assert len(wire) == 4 + 25
        event = Connect(b"mx.example", AddressFamily.INET, 49152, b"192.0.2.1")
        assert event.encode() == wire
        conn = milter(connect=False)
        assert one_event(conn, wire) == event
        assert conn.owed == ord("C")

    def test_macro_packet_before_mail(self) -> None:
        payload = b"M" + b"i\0ABC123\0{mail_addr}\0a@b\0"
        wire = bytes.fromhex("0000001B 44") + payload
        define = DefineMacros(ord("M"), ((b"i", b"ABC123"), (b"{mail_addr}", b"a@b")))
        assert define.encode() == wire
        assert decode_command(ord("D"), payload) == define
        conn = milter()
        assert events(conn, wire) == []
        assert conn.macros.get(b"i") == b"ABC123"
        assert conn.macros.get(b"{i}") == b"ABC123"
        assert conn.macros.get(b"mail_addr") == b"a@b"
        assert conn.macros.get(b"{mail_addr}") == b"a@b"

    @pytest.mark.parametrize("setup", ["connected", "in_message", "after_data"])
    def test_empty_postfix_macro_packet_is_accepted_silently(self, setup: str) -> None:
        empty_dn = bytes.fromhex("00000002 44 4E")
        assert DefineMacros(ord("N")).encode() == empty_dn
        conn = milter()
        if setup != "connected":
            events(conn, frame("M", strings(b"<a@b>")) + frame("R", strings(b"<c@d>")))
        if setup == "after_data":
            events(conn, frame("T"))
        state = conn.state
        assert events(conn, empty_dn) == []
        assert conn.owed is None
        assert conn.state is state
        assert conn.buffered == 0

    def test_reply_code_single_line(self) -> None:
        wire = bytes.fromhex("00000013 79") + b"550 5.7.1 Go away\0"
        assert ReplyWithCode(b"550 5.7.1 Go away").encode() == wire
        assert decode_reply(wire[4], wire[5:]) == ReplyWithCode(b"550 5.7.1 Go away")

    def test_reply_code_multi_line(self) -> None:
        text = b"550-5.7.1 line one\r\n550 5.7.1 line two"
        wire = frame("y", text + b"\0")
        assert wire[:5] == bytes.fromhex("00000028 79")  # 1 + 18 + 2 + 18 + 1
        assert ReplyWithCode(text).encode() == wire
        conn = milter()
        one_event(conn, frame("M", strings(b"<a@b>")))
        assert conn.send(ReplyWithCode(text)) == wire

    def test_insert_header_at_top(self) -> None:
        wire = bytes.fromhex("0000000B 69 00000000") + b"X-A\0v\0"
        assert InsertHeader(0, b"X-A", b"v").encode() == wire
        assert decode_reply(wire[4], wire[5:]) == InsertHeader(0, b"X-A", b"v")

    def test_delete_second_header(self) -> None:
        wire = bytes.fromhex("0000000A 6D 00000002") + b"X-B\0\0"
        assert ChangeHeader(2, b"X-B", b"").encode() == wire
        assert decode_reply(wire[4], wire[5:]) == ChangeHeader(2, b"X-B", b"")

    def test_body_replacement_of_100000_bytes_in_two_chunks(self) -> None:
        body = bytes(range(256)) * 390 + b"x" * 160
        assert len(body) == 100_000
        first, second = ReplaceBody(body[:65535]), ReplaceBody(body[65535:])
        assert first.encode() == bytes.fromhex("00010000 62") + body[:65535]
        assert second.encode() == bytes.fromhex("000086A2 62") + body[65535:]
        assert len(body[65535:]) == 34465

        # Through both roles: EOM, b, b, c.
        milter_conn = milter(Actions.REPLACE_BODY)
        mta_conn = mta(Actions.REPLACE_BODY)
        for command in (Mail((b"<a@b>",)), Rcpt((b"<c@d>",)), EndOfMessage()):
            wire = mta_conn.send(command)
            one_event(milter_conn, wire)
            if command.code != ord("E"):
                feed_replies(mta_conn, milter_conn.send(CONTINUE))
        out = milter_conn.send(first) + milter_conn.send(second) + milter_conn.send(CONTINUE)
        assert [code for code, _ in split_frames(out)] == [ord("b"), ord("b"), ord("c")]
        replies = feed_replies(mta_conn, out)
        assert replies == [first, second, CONTINUE]
        assert b"".join(r.chunk for r in replies if isinstance(r, ReplaceBody)) == body
        assert mta_conn.state is State.SESSION


# --- every command ---------------------------------------------------------------

COMMAND_VECTORS: list[tuple[str, Command, bytes]] = [
    (
        "optneg-v2",
        OptionNegotiation(2, Actions(0x0F), ProtocolOpts(0x3F)),
        bytes.fromhex("0000000D 4F 00000002 0000000F 0000003F"),
    ),
    ("macro-empty", DefineMacros(ord("N")), bytes.fromhex("00000002 44 4E")),
    (
        "macro-connect",
        DefineMacros(ord("C"), ((b"j", b"mx"), (b"{daemon_name}", b"mx"))),
        frame("D", b"C" + strings(b"j", b"mx", b"{daemon_name}", b"mx")),
    ),
    (
        "macro-empty-value",
        DefineMacros(ord("R"), ((b"{rcpt_host}", b""),)),
        frame("D", b"R{rcpt_host}\0\0"),
    ),
    (
        "connect-inet6",
        Connect(b"[2001:db8::1]", AddressFamily.INET6, 25, b"2001:db8::1"),
        frame("C", b"[2001:db8::1]\0" + b"6" + b"\x00\x19" + b"2001:db8::1\0"),
    ),
    (
        "connect-unix",
        Connect(b"localhost", AddressFamily.UNIX, 0, b"/run/milter.sock"),
        frame("C", b"localhost\0L\x00\x00/run/milter.sock\0"),
    ),
    (
        "connect-unknown",
        Connect(b"unknown", AddressFamily.UNKNOWN),
        bytes.fromhex("0000000A 43") + b"unknown\0U",
    ),
    (
        "connect-inet-high-port",
        Connect(b"[192.0.2.1]", AddressFamily.INET, 65535, b"192.0.2.1"),
        frame("C", b"[192.0.2.1]\x004\xff\xff192.0.2.1\0"),
    ),
    ("helo", Helo(b"client.example"), frame("H", b"client.example\0")),
    ("mail-plain", Mail((b"<a@b>",)), frame("M", b"<a@b>\0")),
    ("mail-null-sender", Mail((b"<>",)), bytes.fromhex("00000004 4D") + b"<>\0"),
    (
        "mail-esmtp",
        Mail((b"<a@b>", b"SIZE=123", b"BODY=8BITMIME")),
        frame("M", b"<a@b>\0SIZE=123\0BODY=8BITMIME\0"),
    ),
    ("rcpt-plain", Rcpt((b"<c@d>",)), frame("R", b"<c@d>\0")),
    (
        "rcpt-esmtp",
        Rcpt((b"<c@d>", b"NOTIFY=NEVER", b"ORCPT=rfc822;c@d")),
        frame("R", b"<c@d>\0NOTIFY=NEVER\0ORCPT=rfc822;c@d\0"),
    ),
    ("data", DATA, bytes.fromhex("00000001 54")),
    ("header", Header(b"Subject", b"hello"), frame("L", b"Subject\0hello\0")),
    (
        "header-folded",
        Header(b"To", b"a@b,\n\tc@d"),
        frame("L", b"To\0a@b,\n\tc@d\0"),
    ),
    ("header-empty-value", Header(b"X-Empty", b""), frame("L", b"X-Empty\0\0")),
    ("eoh", END_OF_HEADERS, bytes.fromhex("00000001 4E")),
    ("body", Body(b"line 1\r\nwith \0 NUL\r\n"), frame("B", b"line 1\r\nwith \0 NUL\r\n")),
    ("body-empty", Body(b""), bytes.fromhex("00000001 42")),
    ("eom", EndOfMessage(), bytes.fromhex("00000001 45")),
    ("eom-with-chunk", EndOfMessage(b"tail\r\n"), frame("E", b"tail\r\n")),
    ("abort", ABORT, bytes.fromhex("00000001 41")),
    ("quit", QUIT, bytes.fromhex("00000001 51")),
    ("quit-nc", QUIT_NEW_CONNECTION, bytes.fromhex("00000001 4B")),
    ("unknown", Unknown(b"XYZZY plugh"), frame("U", b"XYZZY plugh\0")),
]


@pytest.mark.parametrize(
    ("command", "wire"), [v[1:] for v in COMMAND_VECTORS], ids=[v[0] for v in COMMAND_VECTORS]
)
def test_command_encoding(command: Command, wire: bytes) -> None:
    assert command.encode() == wire
    ((code, payload),) = split_frames(wire)
    assert code == command.code
    assert decode_command(code, payload) == command


def test_every_command_code_has_a_vector() -> None:
    assert {v[1].code for v in COMMAND_VECTORS} == set(CommandCode)


# --- every reply -----------------------------------------------------------------

REPLY_VECTORS: list[tuple[str, Reply, bytes]] = [
    (
        "optneg",
        OptionNegotiationReply(6, Actions.NONE, ProtocolOpts.NONE),
        bytes.fromhex("0000000D 4F 00000006 00000000 00000000"),
    ),
    ("continue", CONTINUE, bytes.fromhex("00000001 63")),
    ("accept", ACCEPT, bytes.fromhex("00000001 61")),
    ("reject", REJECT, bytes.fromhex("00000001 72")),
    ("tempfail", TEMPFAIL, bytes.fromhex("00000001 74")),
    ("discard", DISCARD, bytes.fromhex("00000001 64")),
    ("skip", SKIP, bytes.fromhex("00000001 73")),
    ("progress", PROGRESS, bytes.fromhex("00000001 70")),
    ("shutdown", SHUTDOWN, bytes.fromhex("00000001 34")),
    ("replycode", ReplyWithCode(b"451 4.7.1 Later"), frame("y", b"451 4.7.1 Later\0")),
    ("quarantine", Quarantine(b"suspicious"), frame("q", b"suspicious\0")),
    ("addheader", AddHeader(b"X-Spam", b"no"), frame("h", b"X-Spam\0no\0")),
    (
        "addheader-multiline",
        AddHeader(b"X-Long", b"one\n\ttwo"),
        frame("h", b"X-Long\0one\n\ttwo\0"),
    ),
    (
        "insheader",
        InsertHeader(3, b"X-A", b"v"),
        bytes.fromhex("0000000B 69 00000003") + b"X-A\0v\0",
    ),
    (
        "chgheader",
        ChangeHeader(1, b"Subject", b"[SPAM] hi"),
        frame("m", bytes.fromhex("00000001") + b"Subject\0[SPAM] hi\0"),
    ),
    ("addrcpt", AddRecipient(b"<x@y>"), frame("+", b"<x@y>\0")),
    ("addrcpt-par-no-args", AddRecipientExt(b"<x@y>"), frame("2", b"<x@y>\0")),
    (
        "addrcpt-par-args",
        AddRecipientExt(b"<x@y>", b"NOTIFY=NEVER"),
        frame("2", b"<x@y>\0NOTIFY=NEVER\0"),
    ),
    ("delrcpt", DeleteRecipient(b"<c@d>"), frame("-", b"<c@d>\0")),
    ("chgfrom-no-args", ChangeSender(b"<new@b>"), frame("e", b"<new@b>\0")),
    (
        "chgfrom-args",
        ChangeSender(b"<new@b>", b"RET=HDRS"),
        frame("e", b"<new@b>\0RET=HDRS\0"),
    ),
    ("replbody", ReplaceBody(b"new body\r\n"), frame("b", b"new body\r\n")),
    ("replbody-empty", ReplaceBody(b""), bytes.fromhex("00000001 62")),
]


@pytest.mark.parametrize(
    ("reply", "wire"), [v[1:] for v in REPLY_VECTORS], ids=[v[0] for v in REPLY_VECTORS]
)
def test_reply_encoding(reply: Reply, wire: bytes) -> None:
    assert reply.encode() == wire
    ((code, payload),) = split_frames(wire)
    assert code == reply.code
    assert decode_reply(code, payload) == reply


def test_every_sendable_reply_code_has_a_vector() -> None:
    # SETSYMLIST and CONN_FAIL are defined but never sent (protocol.md §2.2).
    sendable = set(ReplyCode) - {ReplyCode.SETSYMLIST, ReplyCode.CONN_FAIL}
    assert {v[1].code for v in REPLY_VECTORS} == sendable


@pytest.mark.parametrize("code", ["l", "f", "x", "C"])
def test_unsendable_reply_codes_are_refused(code: str) -> None:
    with pytest.raises(RemoteProtocolError, match="not a reply"):
        decode_reply(ord(code), b"")


@pytest.mark.parametrize("code", ["c", "X", "y", "\0"])
def test_unknown_command_codes_are_refused(code: str) -> None:
    with pytest.raises(RemoteProtocolError, match="not a milter command"):
        decode_command(ord(code), b"")


# --- connect families ------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (
            b"mx.example\x004\xc0\x00192.0.2.1\0",
            Connect(b"mx.example", AddressFamily.INET, 49152, b"192.0.2.1"),
        ),
        (
            b"[2001:db8::1]\x006\x01\xbbIPv6:2001:db8::1\0",
            # The engine keeps the address as sent; stripping "IPv6:" is the caller's job.
            Connect(b"[2001:db8::1]", AddressFamily.INET6, 443, b"IPv6:2001:db8::1"),
        ),
        (
            b"localhost\x00L\x00\x00/var/run/x.sock\0",
            Connect(b"localhost", AddressFamily.UNIX, 0, b"/var/run/x.sock"),
        ),
        (b"unknown\0U", Connect(b"unknown", AddressFamily.UNKNOWN)),
        # libmilter ignores whatever follows an unknown family.
        (b"unknown\0U\x00\x19junk\0", Connect(b"unknown", AddressFamily.UNKNOWN)),
        (b"\x004\x00\x19\0", Connect(b"", AddressFamily.INET, 25, b"")),
    ],
    ids=["inet", "inet6", "unix", "unknown", "unknown-trailing", "empty-strings"],
)
def test_connect_families_decode(payload: bytes, expected: Connect) -> None:
    assert decode_command(ord("C"), payload) == expected
    assert isinstance(expected.family, AddressFamily)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "hostname"),
        (b"host", "hostname"),
        (b"host\0", "family"),
        (b"host\0X\x00\x19a\0", "unknown address family"),
        (b"host\x004", "port"),
        (b"host\x004\x00\x19", "port"),
        (b"host\x004\x00\x19a", "port"),
        (b"host\x004\x00\x19a\0b\0", "after the address"),
    ],
)
def test_connect_malformed(payload: bytes, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        decode_command(ord("C"), payload)


# --- optional ESMTP args of '2' and 'e' ------------------------------------------


@pytest.mark.parametrize(
    ("code", "payload", "expected"),
    [
        ("2", b"<x@y>\0", AddRecipientExt(b"<x@y>", None)),
        ("2", b"<x@y>\0NOTIFY=NEVER\0", AddRecipientExt(b"<x@y>", b"NOTIFY=NEVER")),
        ("2", b"<x@y>\0\0", AddRecipientExt(b"<x@y>", b"")),
        ("e", b"<s@b>\0", ChangeSender(b"<s@b>", None)),
        ("e", b"<s@b>\0RET=FULL ENVID=x\0", ChangeSender(b"<s@b>", b"RET=FULL ENVID=x")),
    ],
)
def test_optional_esmtp_args(code: str, payload: bytes, expected: Reply) -> None:
    assert decode_reply(ord(code), payload) == expected
    assert expected.encode() == frame(code, payload)


@pytest.mark.parametrize("code", ["2", "e"])
@pytest.mark.parametrize("payload", [b"", b"<x@y>", b"<x@y>\0a\0b\0"])
def test_esmtp_args_malformed(code: str, payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_reply(ord(code), payload)


# --- macro lists in the O reply --------------------------------------------------


def test_macro_lists_for_several_stages() -> None:
    head = bytes.fromhex("00000006 00000101 00000000")
    lists = (
        bytes.fromhex("00000000")
        + b"j {daemon_name}\0"
        + bytes.fromhex("00000002")
        + b"{auth_authen} i\0"
        + bytes.fromhex("00000006")
        + b"\0"  # EOH (wire stage 6): an empty list
        + bytes.fromhex("00000005")
        + b"{msg_id}\0"
    )
    reply = OptionNegotiationReply(
        6,
        Actions.ADD_HEADER | Actions.REQUEST_MACROS,
        ProtocolOpts.NONE,
        (
            (MacroStage.CONNECT, b"j {daemon_name}"),
            (MacroStage.MAIL, b"{auth_authen} i"),
            (MacroStage.EOH, b""),
            (MacroStage.EOM, b"{msg_id}"),
        ),
    )
    assert reply.encode() == frame("O", head + lists)
    decoded = decode_reply(ord("O"), head + lists)
    assert decoded == reply
    assert isinstance(decoded, OptionNegotiationReply)
    assert [stage for stage, _ in decoded.macros] == [0, 2, 6, 5]


def test_negotiated_macro_lists_are_sorted_by_stage_number() -> None:
    negotiated = negotiate(
        POSTFIX_OFFER,
        Actions.REQUEST_MACROS,
        ProtocolOpts.NONE,
        {MacroStage.EOH: b"i", MacroStage.CONNECT: b"j"},
    )
    assert negotiated.reply().encode() == frame(
        "O",
        bytes.fromhex("00000006 00000100 00000000 00000000")
        + b"j\0"
        + bytes.fromhex("00000006")
        + b"i\0",
    )


@pytest.mark.parametrize(
    ("tail", "message"),
    [
        (bytes.fromhex("000000"), "truncated"),
        (bytes.fromhex("00000002"), "truncated"),
        (bytes.fromhex("00000002") + b"i", "not NUL-terminated"),
        (bytes.fromhex("00000007") + b"i\0", "unknown macro stage 7"),
        (bytes.fromhex("00000002") + b"i\0" + b"\x00", "truncated"),
    ],
)
def test_macro_lists_malformed(tail: bytes, message: str) -> None:
    head = bytes.fromhex("00000006 00000100 00000000")
    with pytest.raises(RemoteProtocolError, match=message):
        decode_reply(ord("O"), head + tail)


def test_optneg_payload_too_short() -> None:
    with pytest.raises(RemoteProtocolError, match="at least 12 bytes"):
        decode_command(ord("O"), bytes(11))
    with pytest.raises(RemoteProtocolError, match="at least 12 bytes"):
        decode_reply(ord("O"), bytes(11))


def test_optneg_offer_ignores_trailing_bytes() -> None:
    # libmilter reads the first 12 bytes and ignores the rest (future MTAs).
    payload = bytes.fromhex("00000006 000001FF 001FFFFF") + b"future"
    assert decode_command(ord("O"), payload) == POSTFIX_OFFER


# --- malformed payloads of the other codecs --------------------------------------


@pytest.mark.parametrize(
    ("code", "payload"),
    [
        ("D", b""),
        ("D", b"Mi"),
        ("D", b"Mi\0"),
        ("D", b"Mi\0v\0j\0"),
        ("H", b""),
        ("H", b"helo"),
        ("M", b""),
        ("M", b"<a@b>"),
        ("R", b"<a@b>\0x"),
        ("T", b"x"),
        ("L", b"Subject\0"),
        ("L", b"Subject\0v\0extra\0"),
        ("L", b"Subject\0v"),
        ("N", b"\0"),
        ("A", b"x"),
        ("Q", b"x"),
        ("K", b"x"),
        ("U", b""),
        ("U", b"HELP"),
    ],
)
def test_malformed_command_payloads(code: str, payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError, match=r"\('" + code + r"'\)"):
        decode_command(ord(code), payload)


def test_helo_keeps_the_first_string() -> None:
    # Old Sendmail could send more than one string; libmilter uses the first.
    assert decode_command(ord("H"), b"first\0second\0") == Helo(b"first")


@pytest.mark.parametrize(
    ("code", "payload"),
    [
        ("c", b"x"),
        ("a", b"\0"),
        ("s", b"x"),
        ("4", b"x"),
        ("y", b""),
        ("y", b"550 no"),
        ("y", b"550\0more\0"),
        ("q", b"a\0b\0"),
        ("h", b"X\0"),
        ("i", b"\0\0\0"),
        ("i", b"\0\0\0\0X\0"),
        ("m", b""),
        ("m", b"\0\0\0\x01X\0v"),
        ("+", b"a\0b\0"),
        ("-", b""),
    ],
)
def test_malformed_reply_payloads(code: str, payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_reply(ord(code), payload)


def test_encoders_refuse_nul_inside_strings() -> None:
    with pytest.raises(ValueError, match="NUL"):
        Header(b"X\0Y", b"v").encode()
    with pytest.raises(ValueError, match="NUL"):
        AddHeader(b"X", b"a\0b").encode()
    with pytest.raises(ValueError, match="NUL"):
        DefineMacros(ord("M"), ((b"i", b"a\0b"),)).encode()
    with pytest.raises(ValueError, match="NUL"):
        OptionNegotiationReply(
            6, Actions.NONE, ProtocolOpts.NONE, ((MacroStage.MAIL, b"a\0"),)
        ).encode()


def test_reply_with_code_class() -> None:
    assert ReplyWithCode(b"550 5.7.1 no").is_permanent
    assert not ReplyWithCode(b"451 4.7.1 later").is_permanent


def test_simple_replies_are_values() -> None:
    assert Continue() == CONTINUE
    assert Continue() != Reject()
    assert hash(Continue()) == hash(CONTINUE)
    assert repr(CONTINUE) == "Continue()"
    assert {CONTINUE, Continue(), REJECT} == {CONTINUE, REJECT}
