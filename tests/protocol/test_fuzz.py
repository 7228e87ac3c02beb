"""Fuzzing: garbage in, only `RemoteProtocolError` out.

Random and mutated byte streams (a valid Postfix-like session with bytes
flipped, cut, inserted, lengths changed, packets swapped) are fed to a
`MilterConnection` that answers every owed reply like a well-behaved milter,
and mutated reply streams to an `MtaConnection` that sends a session's
commands as its state allows. Whatever the bytes, the engine may only raise
`RemoteProtocolError` -- never IndexError, struct.error, UnicodeDecodeError,
KeyError, AssertionError, ValueError or a `LocalProtocolError` blaming the
well-behaved caller -- and the same stream in any split gives the same events
and the same error.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from triomilter.protocol import (
    ABORT,
    ALL_ACTIONS,
    ALL_PROTOCOL_OPTS,
    CONTINUE,
    DATA,
    END_OF_HEADERS,
    NO_FLAG,
    QUIT,
    Actions,
    AddHeader,
    Body,
    ChangeHeader,
    Command,
    CommandCode,
    Connect,
    DefineMacros,
    EndOfMessage,
    Header,
    Helo,
    InsertHeader,
    LocalProtocolError,
    MacroStore,
    Mail,
    MilterConnection,
    MtaConnection,
    NeedData,
    OptionNegotiation,
    ProtocolOpts,
    Rcpt,
    RemoteProtocolError,
    ReplaceBody,
    Unknown,
    decode_command,
    decode_reply,
    negotiate,
)
from triomilter.protocol import AddressFamily as AF

from ._helpers import FUZZ_SETTINGS, POSTFIX_OFFER_BYTES, chunks, frame, macro_frame, strings

P = ProtocolOpts

# --- a valid Postfix-like session, as frames ---------------------------------------


def _message(queue_id: bytes) -> list[bytes]:
    frames = [
        macro_frame("M", (b"i", queue_id), (b"{mail_addr}", b"a@b")),
        frame("M", strings(b"<a@b>", b"SIZE=100")),
    ]
    for rcpt in (b"<c@d>", b"<e@f>"):
        frames += [macro_frame("R", (b"{rcpt_addr}", rcpt[1:-1])), frame("R", strings(rcpt))]
    frames += [macro_frame("T", (b"i", queue_id)), frame("T")]
    for name, value in ((b"From", b"a@b"), (b"Subject", b"hi\n\tthere")):
        frames += [macro_frame("L", (b"i", queue_id)), frame("L", strings(name, value))]
    frames += [
        macro_frame("N", (b"i", queue_id)),
        frame("N"),
        macro_frame("B"),
        frame("B", b"hello\r\n\0world\r\n"),
        macro_frame("E", (b"i", queue_id)),
        frame("E"),
        frame("A"),
    ]
    return frames


SESSION_FRAMES: list[bytes] = [
    POSTFIX_OFFER_BYTES,
    macro_frame("C", (b"j", b"mx.example"), (b"{daemon_name}", b"mx"), (b"v", b"Postfix")),
    frame("C", b"client.example\x004\xc0\x00192.0.2.1\0"),
    macro_frame("H"),
    frame("H", strings(b"client.example")),
    *_message(b"AAA111"),
    frame("U", strings(b"XYZZY")),
    *_message(b"BBB222"),
    frame("A"),
    frame("K"),
    frame("C", b"localhost\x00L\x00\x00/run/sock\0"),
    frame("Q"),
]
SESSION = b"".join(SESSION_FRAMES)

# What the milter asks for at negotiation: plain, headers-only without replies,
# everything with SKIP, and NOREPLY for stages (some faked, see the v2 offer).
WISHES: list[tuple[Actions, ProtocolOpts]] = [
    (Actions.NONE, P.NONE),
    (Actions.ADD_HEADER, P(0x3DF)),
    (ALL_ACTIONS, P.SKIP | P.HEADER_LEADING_SPACE),
    (Actions.ADD_HEADER | Actions.REPLACE_BODY, P.NOREPLY_HEADER | P.NOREPLY_RCPT | P.NO_HELO),
    (Actions.NONE, P.NO_DATA | P.NO_UNKNOWN | P.NOREPLY_CONNECT | P.NOREPLY_BODY),
]


def session_for(opts: ProtocolOpts) -> list[bytes]:
    """The session as an MTA sends it to a milter that negotiated ``opts``: the
    commands disabled by ``NO_*`` left out, their ``D`` packets kept (Postfix)."""
    disabled = {code for code, flag in NO_FLAG.items() if opts & flag}
    return [f for f in SESSION_FRAMES if f[4] not in disabled]


# --- mutations ---------------------------------------------------------------------


@st.composite
def mutated_stream(draw: st.DrawFn, base: Sequence[bytes] = tuple(SESSION_FRAMES)) -> bytes:
    """``base`` (a list of packets) with 1 to 4 random mutations.

    Packet-level mutations (length field, code byte, swap, duplicate, drop)
    come first, then byte-level ones (flip, truncate, insert, delete).
    Positions come from a Hypothesis-seeded `random.Random`: uniform over the
    session (plain integer strategies favour the first packets) yet
    reproducible.
    """
    rnd = draw(st.randoms(use_true_random=True))
    frames = [bytearray(f) for f in base]
    kinds = draw(
        st.lists(
            st.sampled_from(
                ["length", "code", "swap", "dup", "drop", "flip", "truncate", "insert", "delete"]
            ),
            min_size=1,
            max_size=4,
        )
    )
    for kind in sorted(kinds, key=lambda k: k in ("flip", "truncate", "insert", "delete")):
        if kind == "length":
            new = draw(
                st.one_of(
                    st.integers(0, 40),
                    st.integers(0, 2**32 - 1),
                    st.sampled_from([0, 1, 65536, 65537, 2**31]),
                )
            )
            rnd.choice(frames)[:4] = struct.pack(">I", new)
        elif kind == "code":
            rnd.choice(frames)[4] = draw(st.integers(0, 255))
        elif kind == "swap":
            i, j = rnd.randrange(len(frames)), rnd.randrange(len(frames))
            frames[i], frames[j] = frames[j], frames[i]
        elif kind == "dup":
            frames.insert(rnd.randrange(len(frames) + 1), bytearray(rnd.choice(frames)))
        elif kind == "drop" and len(frames) > 1:
            del frames[rnd.randrange(len(frames))]
        else:
            data = bytearray(b"".join(frames))
            pos = rnd.randrange(len(data) + 1)
            if kind == "flip" and pos < len(data):
                data[pos] ^= draw(st.integers(1, 255))
            elif kind == "truncate":
                del data[pos:]
            elif kind == "insert":
                data[pos:pos] = draw(st.binary(min_size=1, max_size=12))
            elif kind == "delete":
                del data[pos : pos + rnd.randint(1, 8)]
            frames = [data]
    return b"".join(frames)


COMMAND_CODES = [int(c) for c in CommandCode]


@st.composite
def random_frame_streams(draw: st.DrawFn) -> bytes:
    """Well-framed packets with any command code (mostly real ones) and any payload."""
    codes = st.one_of(st.sampled_from(COMMAND_CODES), st.integers(0, 255))
    frames = draw(st.lists(st.tuples(codes, st.binary(max_size=40)), max_size=25))
    prefix = POSTFIX_OFFER_BYTES if draw(st.booleans()) else b""
    return prefix + b"".join(frame(code, payload) for code, payload in frames)


@st.composite
def milter_cases(draw: st.DrawFn) -> tuple[bytes, tuple[Actions, ProtocolOpts]]:
    """Wishes, and a stream to feed a milter with them: mostly the session valid
    for those wishes, mutated; sometimes random packets or random bytes."""
    wishes = draw(st.sampled_from(WISHES))
    stream = draw(
        st.one_of(
            mutated_stream(session_for(wishes[1])),
            mutated_stream(session_for(wishes[1])),
            mutated_stream(),
            random_frame_streams(),
            st.binary(max_size=300),
        )
    )
    return stream, wishes


# --- the milter role -------------------------------------------------------------


def run_milter(
    pieces: Sequence[bytes], wishes: tuple[Actions, ProtocolOpts]
) -> tuple[list[object], str | None]:
    """Feed ``pieces`` like a socket would; answer like a well-behaved milter.

    Returns the events (with the macros visible at each) and the error text.
    Any exception other than `RemoteProtocolError` propagates and fails the test.
    """
    conn = MilterConnection()
    seen: list[object] = []
    try:
        for piece in pieces:
            conn.receive_data(piece)
            while True:
                event = conn.next_event()
                if isinstance(event, NeedData):
                    break
                # Macro sets are parsed lazily: look them up to parse them now.
                seen.append((event, conn.macros.snapshot(), conn.macros.get(b"{i}")))
                owed = conn.owed
                if owed is None:
                    continue
                if owed == CommandCode.OPTNEG:
                    assert isinstance(event, OptionNegotiation)
                    conn.accept_negotiation(negotiate(event, *wishes))
                elif owed == CommandCode.EOM:
                    assert conn.negotiated is not None
                    actions = conn.negotiated.actions
                    if actions & Actions.ADD_HEADER:
                        conn.send(AddHeader(b"X-Fuzz", b"1"))
                    if actions & Actions.REPLACE_BODY:
                        conn.send(ReplaceBody(b"new\r\n"))
                    conn.send(CONTINUE)
                else:
                    conn.send(CONTINUE)
                assert conn.owed is None
    except RemoteProtocolError as exc:
        return seen, str(exc)
    return seen, None


@FUZZ_SETTINGS
@given(case=milter_cases(), data=st.data())
def test_milter_role_raises_only_remote_errors(
    case: tuple[bytes, tuple[Actions, ProtocolOpts]], data: st.DataObject
) -> None:
    stream, wishes = case
    whole = run_milter([stream], wishes)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20), label="cuts")
    assert run_milter(chunks(stream, cuts), wishes) == whole


@settings(FUZZ_SETTINGS, max_examples=100)
@given(case=milter_cases())
def test_milter_role_byte_at_a_time_matches_whole(
    case: tuple[bytes, tuple[Actions, ProtocolOpts]],
) -> None:
    stream, wishes = case
    pieces = [stream[i : i + 1] for i in range(len(stream))]
    assert run_milter(pieces, wishes) == run_milter([stream], wishes)


@pytest.mark.parametrize("wishes", WISHES, ids=[hex(w[1]) for w in WISHES])
def test_unmutated_session_with_every_wish_set(wishes: tuple[Actions, ProtocolOpts]) -> None:
    seen, error = run_milter([b"".join(session_for(wishes[1]))], wishes)
    assert error is None
    kinds = [type(item[0]).__name__ for item in seen]  # type: ignore[index]
    assert kinds[0] == "OptionNegotiation"
    assert kinds[-1] == "Quit"
    assert kinds.count("EndOfMessage") == 2
    assert kinds.count("QuitNewConnection") == 1


# --- the MTA role (reply side) -----------------------------------------------------

MTA_SCRIPT: list[Command] = [
    DefineMacros(ord("C"), ((b"j", b"mx"),)),
    Connect(b"client.example", AF.INET, 25, b"192.0.2.1"),
    Helo(b"client.example"),
    *(
        cast(
            list[Command],
            [
                DefineMacros(ord("M"), ((b"i", b"Q1"),)),
                Mail((b"<a@b>",)),
                Rcpt((b"<c@d>",)),
                Rcpt((b"<e@f>",)),
                DATA,
                Header(b"Subject", b"hi"),
                END_OF_HEADERS,
                Body(b"body\r\n"),
                Body(b"more\r\n"),
                EndOfMessage(),
                ABORT,
                Unknown(b"HELP"),
            ],
        )
        * 2
    ),
    QUIT,
]

REPLY_FRAMES: list[bytes] = [
    frame("O", bytes.fromhex("00000006 000001FF 00000400") + b"\0\0\0\x02i {auth_type}\0"),
    frame("c"),  # C
    frame("c"),  # H
    *(
        [
            frame("c"),  # M
            frame("c"),  # R
            frame("y", b"450 4.1.1 try later\0"),  # R
            frame("c"),  # T
            frame("c"),  # L
            frame("c"),  # N
            frame("c"),  # B
            frame("s"),  # B (skip)
            frame("p"),  # E
            frame("h", strings(b"X-A", b"1")),
            frame("i", b"\0\0\0\0" + strings(b"X-B", b"2")),
            frame("m", b"\0\0\0\x01" + strings(b"Subject", b"")),
            frame("b", b"new body\r\n"),
            frame("b", b"more\r\n"),
            frame("+", strings(b"<x@y>")),
            frame("2", strings(b"<x@y>", b"NOTIFY=NEVER")),
            frame("-", strings(b"<c@d>")),
            frame("e", strings(b"<s@b>")),
            frame("q", strings(b"held")),
            frame("c"),  # E (final)
            frame("r"),  # U
        ]
        * 2
    ),
]
REPLIES = b"".join(REPLY_FRAMES)


def run_mta(pieces: Sequence[bytes]) -> tuple[list[object], str | None]:
    """Send the script as the state allows, feeding reply bytes in ``pieces``."""
    conn = MtaConnection()
    script = iter(MTA_SCRIPT)
    sent: list[bytes] = [conn.send(OptionNegotiation(6, ALL_ACTIONS, ALL_PROTOCOL_OPTS))]
    seen: list[object] = []

    def advance() -> None:
        while conn.awaiting is None:
            command = next(script, None)
            if command is None:
                return
            try:
                sent.append(conn.send(command))
            except LocalProtocolError:
                # Not valid here (a reply ended the message, a NO_* step): an MTA
                # would not send it. This is the script probing, not the engine failing.
                continue

    try:
        for piece in pieces:
            conn.receive_data(piece)
            while True:
                reply = conn.next_event()
                if isinstance(reply, NeedData):
                    break
                seen.append((reply, conn.state, conn.awaiting))
                advance()
    except RemoteProtocolError as exc:
        return [*seen, b"".join(sent)], str(exc)
    return [*seen, b"".join(sent)], None


REPLY_CODES = [ord(c) for c in "Ocartdyspqhim+2-eb4lf"]


@st.composite
def random_reply_streams(draw: st.DrawFn) -> bytes:
    codes = st.one_of(st.sampled_from(REPLY_CODES), st.integers(0, 255))
    frames = draw(st.lists(st.tuples(codes, st.binary(max_size=30)), max_size=20))
    prefix = REPLY_FRAMES[0] if draw(st.booleans()) else b""
    return prefix + b"".join(frame(code, payload) for code, payload in frames)


def test_unmutated_reply_stream_runs_to_the_end() -> None:
    seen, error = run_mta([REPLIES])
    assert error is None
    assert len(seen) == len(REPLY_FRAMES) + 1
    # The rejected second recipient did not end the message; each message ended at EOM.
    assert [type(s[0]).__name__ for s in seen[:3]] == [  # type: ignore[index]
        "OptionNegotiationReply",
        "Continue",
        "Continue",
    ]


@settings(FUZZ_SETTINGS, max_examples=200)
@given(
    stream=st.one_of(mutated_stream(REPLY_FRAMES), random_reply_streams(), st.binary(max_size=200)),
    data=st.data(),
)
def test_mta_role_raises_only_remote_errors(stream: bytes, data: st.DataObject) -> None:
    whole = run_mta([stream])
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20), label="cuts")
    assert run_mta(chunks(stream, cuts)) == whole


# --- the codecs and the macro store on their own -----------------------------------


@FUZZ_SETTINGS
@given(code=st.integers(0, 255), payload=st.binary(max_size=60))
def test_decoders_raise_only_remote_errors(code: int, payload: bytes) -> None:
    for decode in (decode_command, decode_reply):
        try:
            decoded = decode(code, payload)
        except RemoteProtocolError:
            continue
        # Whatever decodes re-encodes to a packet that decodes the same.
        wire = decoded.encode()
        assert wire[4] == code
        assert decode(code, wire[5:]) == decoded


@FUZZ_SETTINGS
@given(payloads=st.lists(st.binary(max_size=40), max_size=10), names=st.lists(st.binary()))
def test_macro_store_raises_only_remote_errors(payloads: list[bytes], names: list[bytes]) -> None:
    store = MacroStore()
    for payload in payloads:
        try:
            store.define(payload)
        except RemoteProtocolError:
            continue
        snapshot = store.snapshot()
        for name in [*names, *snapshot]:
            value = store.get(name)
            assert value is None or isinstance(value, bytes)
        for name, value in snapshot.items():
            # Later stages shadow earlier ones, so the snapshot agrees with get().
            assert store.get(name) == value


def test_fuzz_replies_cover_modifications() -> None:
    # Keep the reply stream honest: it exercises every modification class.
    kinds = {decode_reply(f[4], f[5:]).__class__ for f in REPLY_FRAMES}
    assert {AddHeader, InsertHeader, ChangeHeader, ReplaceBody} <= kinds
