"""Replay of a complete Postfix-style session, as raw bytes.

The session is what Postfix 3.x with its default ``milter_*_macros`` sends
to a milter that may add headers (protocol.md §3, §10): a ``D`` before every
event (empty when no macro has a value, ``D L`` before every header, ``D B``
before every body chunk), two messages, an ``A`` after each (two after the
second), then ``Q``. The milter answers CONTINUE everywhere and adds a header
at the end of each message.
"""

from __future__ import annotations

import pytest

from triomilter.protocol import (
    ABORT,
    CONTINUE,
    DATA,
    END_OF_HEADERS,
    QUIT,
    Actions,
    AddHeader,
    AddressFamily,
    Body,
    Command,
    Connect,
    EndOfMessage,
    Header,
    Helo,
    Mail,
    MilterConnection,
    MtaConnection,
    NeedData,
    OptionNegotiation,
    ProtocolOpts,
    Rcpt,
    State,
    decode_command,
    negotiate,
)

from ._helpers import POSTFIX_OFFER, POSTFIX_OFFER_BYTES, feed_replies, frame, split_frames, strings


def D(stage: str, *pairs: tuple[bytes, bytes]) -> bytes:
    return frame("D", stage.encode() + b"".join(strings(n, v) for n, v in pairs))


CONNECT_MACROS = (
    (b"j", b"mx.example.org"),
    (b"{daemon_name}", b"mx.example.org"),
    (b"{daemon_addr}", b"192.0.2.25"),
    (b"v", b"Postfix 3.12.0"),
    (b"_", b"client.example [192.0.2.1]"),
)
CONNECT_VIEW = {
    b"j": b"mx.example.org",
    b"daemon_name": b"mx.example.org",
    b"daemon_addr": b"192.0.2.25",
    b"v": b"Postfix 3.12.0",
    b"_": b"client.example [192.0.2.1]",
}

HEADERS = [
    (b"From", b"Sender <sender@example.net>"),
    (b"To", b"alice@example.org,\n\tbob@example.org"),
    (b"Subject", b"quarterly report"),
]
BODY_CHUNK = b"Hello,\r\n\r\nsee attached.\r\n" * 40


def message_rounds(qid: bytes) -> list[bytes]:
    """One message as Postfix sends it, one element per round trip (a D and its command)."""
    mail_macros = (
        (b"{mail_addr}", b"sender@example.net"),
        (b"{mail_host}", b"example.net"),
        (b"{mail_mailer}", b"smtp"),
    )
    rcpt = (b"{rcpt_host}", b"example.org"), (b"{rcpt_mailer}", b"smtp")
    rounds = [
        # No queue id yet at MAIL: Postfix picks it after the first accepted RCPT.
        D("M", *mail_macros) + frame("M", strings(b"<sender@example.net>", b"SIZE=1234")),
        D("R", (b"{rcpt_addr}", b"alice@example.org"), *rcpt)
        + frame("R", strings(b"<alice@example.org>")),
        D("R", (b"i", qid), (b"{rcpt_addr}", b"bob@example.org"), *rcpt)
        + frame("R", strings(b"<bob@example.org>", b"NOTIFY=NEVER")),
        D("T", (b"i", qid)) + frame("T"),
    ]
    rounds += [D("L", (b"i", qid)) + frame("L", strings(n, v)) for n, v in HEADERS]
    rounds += [
        D("N", (b"i", qid)) + frame("N"),
        D("B", (b"i", qid)) + frame("B", BODY_CHUNK),
        D("E", (b"i", qid)) + frame("E"),
    ]
    return rounds


ROUNDS: list[bytes] = [
    POSTFIX_OFFER_BYTES,
    D("C", *CONNECT_MACROS) + frame("C", b"client.example\x00" + b"4" + b"\xc0\x00192.0.2.1\0"),
    D("H") + frame("H", strings(b"client.example")),
    *message_rounds(b"4ABC123"),
    frame("A") + message_rounds(b"4DEF456")[0],
    *message_rounds(b"4DEF456")[1:],
    frame("A") + frame("A") + frame("Q"),
]
SESSION = b"".join(ROUNDS)


def message_events(qid: bytes) -> list[tuple[Command, dict[bytes, bytes]]]:
    """The events of one message and the macros visible at each."""
    mail = {
        **CONNECT_VIEW,
        b"mail_addr": b"sender@example.net",
        b"mail_host": b"example.net",
        b"mail_mailer": b"smtp",
    }
    rcpt = {b"rcpt_host": b"example.org", b"rcpt_mailer": b"smtp"}
    rcpt1 = {**mail, **rcpt, b"rcpt_addr": b"alice@example.org"}
    rcpt2 = {**mail, **rcpt, b"rcpt_addr": b"bob@example.org", b"i": qid}
    return [
        (Mail((b"<sender@example.net>", b"SIZE=1234")), mail),
        (Rcpt((b"<alice@example.org>",)), rcpt1),
        (Rcpt((b"<bob@example.org>", b"NOTIFY=NEVER")), rcpt2),
        (DATA, rcpt2),
        *[(Header(n, v), rcpt2) for n, v in HEADERS],
        (END_OF_HEADERS, rcpt2),
        (Body(BODY_CHUNK), rcpt2),
        (EndOfMessage(), rcpt2),
    ]


EXPECTED: list[tuple[Command, dict[bytes, bytes]]] = [
    (POSTFIX_OFFER, {}),
    (Connect(b"client.example", AddressFamily.INET, 49152, b"192.0.2.1"), CONNECT_VIEW),
    (Helo(b"client.example"), CONNECT_VIEW),
    *message_events(b"4ABC123"),
    *message_events(b"4DEF456"),
    # QUIT still sees the connection's macros (its close handler may read
    # them, as with libmilter); they are dropped before anything else.
    (QUIT, CONNECT_VIEW),
]

NEGOTIATION_REPLY = bytes.fromhex("0000000D 4F 00000006 00000001 00000000")
CONTINUE_BYTES = bytes.fromhex("00000001 63")
EOM_REPLY = bytes.fromhex("00000016 68") + b"X-Scanned\0" + b"triomilter\0" + CONTINUE_BYTES
# Replies per round: O; C, H; then per message M R R T L L L N B (9 CONTINUEs) and EOM.
REPLIES = NEGOTIATION_REPLY + CONTINUE_BYTES * 2 + (CONTINUE_BYTES * 9 + EOM_REPLY) * 2


class Milter:
    """A milter that answers CONTINUE and adds a header at end of message."""

    def __init__(self) -> None:
        self.conn = MilterConnection()
        self.seen: list[tuple[Command, dict[bytes, bytes]]] = []
        self.out = bytearray()

    def feed(self, data: bytes) -> None:
        conn = self.conn
        conn.receive_data(data)
        while not isinstance(event := conn.next_event(), NeedData):
            self.seen.append((event, conn.macros.snapshot()))
            if conn.owed == ord("O"):
                assert isinstance(event, OptionNegotiation)
                self.out += conn.accept_negotiation(
                    negotiate(event, Actions.ADD_HEADER, ProtocolOpts.NONE)
                )
            elif conn.owed == ord("E"):
                self.out += conn.send(AddHeader(b"X-Scanned", b"triomilter"))
                self.out += conn.send(CONTINUE)
            elif conn.owed is not None:
                self.out += conn.send(CONTINUE)


def test_session_is_postfix_shaped() -> None:
    codes = [chr(code) for code, _ in split_frames(SESSION)]
    assert codes[0] == "O"
    # A D before every event except A and Q.
    for i, code in enumerate(codes):
        if code in "CHMRTLNBE":
            assert codes[i - 1] == "D", (i, code)
    assert codes[-4:] == ["E", "A", "A", "Q"]
    assert codes.count("E") == 2
    assert codes.count("L") == 6


def test_replay_one_round_trip_at_a_time() -> None:
    milter = Milter()
    replies_per_round = []
    for round_bytes in ROUNDS:
        before = len(milter.out)
        milter.feed(round_bytes)
        replies_per_round.append(bytes(milter.out[before:]))
    # Events and the macros visible at each, in order.
    assert [e for e, _ in milter.seen] == [e for e, _ in EXPECTED]
    for (event, seen), (_, expected) in zip(milter.seen, EXPECTED, strict=True):
        assert seen == expected, event
    # Exact reply bytes: O, then one CONTINUE per round, EOM: h + c.
    assert bytes(milter.out) == REPLIES
    assert replies_per_round[0] == NEGOTIATION_REPLY
    assert replies_per_round[1] == CONTINUE_BYTES
    assert replies_per_round[2 + 10] == EOM_REPLY
    assert replies_per_round[-1] == b""  # A A Q: nothing
    # Final state.
    conn = milter.conn
    assert conn.state is State.CLOSED
    assert conn.owed is None
    assert conn.buffered == 0
    assert conn.macros.snapshot() == {}


@pytest.mark.parametrize("step", [1, 3, 64, len(SESSION)], ids=lambda s: f"step{s}")
def test_replay_in_other_splits(step: int) -> None:
    milter = Milter()
    for i in range(0, len(SESSION), step):
        milter.feed(SESSION[i : i + step])
    assert milter.seen == EXPECTED
    assert bytes(milter.out) == REPLIES
    assert milter.conn.state is State.CLOSED


def test_abort_between_messages_and_after_the_last_is_silent() -> None:
    milter = Milter()
    milter.feed(SESSION)
    kinds = [type(e).__name__ for e, _ in milter.seen]
    assert "Abort" not in kinds
    assert ABORT not in [e for e, _ in milter.seen]
    assert kinds[-2:] == ["EndOfMessage", "Quit"]


def test_the_mta_role_produces_and_accepts_the_same_bytes() -> None:
    """Drive MtaConnection with the same commands: same bytes out, replies accepted."""
    conn = MtaConnection()
    sent = bytearray()
    replies = iter(split_frames(REPLIES))
    for code, payload in split_frames(SESSION):
        sent += conn.send(decode_command(code, payload))
        while conn.awaiting is not None:
            reply_code, reply_payload = next(replies)
            (reply,) = feed_replies(conn, frame(reply_code, reply_payload))
            assert reply.code == reply_code
    assert bytes(sent) == SESSION
    assert next(replies, None) is None
    assert conn.state is State.CLOSED
    assert conn.negotiated is not None
    assert conn.negotiated.actions == Actions.ADD_HEADER
