"""Round trips: encode -> decode -> equal, for every command and every reply.

Each class is checked twice: at the codec level (`decode_command`,
`decode_reply`) and through the two roles (`MtaConnection.send` ->
`MilterConnection.next_event` for commands, `MilterConnection.send` ->
`MtaConnection.next_event` for replies), with both connections brought to a
state where the object is valid.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from triomilter.protocol import (
    ABORT,
    ACCEPT,
    ALL_ACTIONS,
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
    NeedData,
    OptionNegotiation,
    OptionNegotiationReply,
    ProtocolOpts,
    Quarantine,
    Rcpt,
    ReplaceBody,
    Reply,
    ReplyCode,
    ReplyWithCode,
    Unknown,
    decode_command,
    decode_reply,
    negotiate,
)

from ._helpers import POSTFIX_OFFER, SETTINGS, feed_replies, one_event, split_frames

u32 = st.integers(0, 2**32 - 1)
text = st.binary(max_size=80).map(lambda b: b.replace(b"\0", b""))
"""A string that may go on the wire NUL-terminated (any byte but NUL)."""
raw = st.binary(max_size=2000)
actions = u32.map(Actions)
opts = u32.map(ProtocolOpts)
macro_pairs = st.lists(st.tuples(text, text), max_size=6).map(tuple)
args = st.lists(text, min_size=1, max_size=5).map(tuple)

connects = st.one_of(
    st.builds(
        Connect,
        text,
        st.sampled_from([AddressFamily.INET, AddressFamily.INET6, AddressFamily.UNIX]),
        st.integers(0, 65535),
        text,
    ),
    st.builds(Connect, text, st.just(AddressFamily.UNKNOWN)),
)

COMMANDS: dict[int, st.SearchStrategy[Command]] = {
    CommandCode.OPTNEG: st.builds(OptionNegotiation, u32, actions, opts),
    CommandCode.MACRO: st.builds(DefineMacros, st.integers(0, 255), macro_pairs),
    CommandCode.CONNECT: connects,
    CommandCode.HELO: st.builds(Helo, text),
    CommandCode.MAIL: st.builds(Mail, args),
    CommandCode.RCPT: st.builds(Rcpt, args),
    CommandCode.DATA: st.just(DATA),
    CommandCode.HEADER: st.builds(Header, text, text),
    CommandCode.EOH: st.just(END_OF_HEADERS),
    CommandCode.BODY: st.builds(Body, raw),
    CommandCode.EOM: st.builds(EndOfMessage, raw),
    CommandCode.ABORT: st.just(ABORT),
    CommandCode.QUIT: st.just(QUIT),
    CommandCode.QUIT_NC: st.just(QUIT_NEW_CONNECTION),
    CommandCode.UNKNOWN: st.builds(Unknown, text),
}

macro_lists = st.lists(st.tuples(st.sampled_from(MacroStage), text), max_size=7).map(tuple)
optional_text = st.none() | text

REPLIES: dict[int, st.SearchStrategy[Reply]] = {
    ReplyCode.OPTNEG: st.builds(OptionNegotiationReply, u32, actions, opts, macro_lists),
    ReplyCode.CONTINUE: st.just(CONTINUE),
    ReplyCode.ACCEPT: st.just(ACCEPT),
    ReplyCode.REJECT: st.just(REJECT),
    ReplyCode.TEMPFAIL: st.just(TEMPFAIL),
    ReplyCode.DISCARD: st.just(DISCARD),
    ReplyCode.SKIP: st.just(SKIP),
    ReplyCode.PROGRESS: st.just(PROGRESS),
    ReplyCode.SHUTDOWN: st.just(SHUTDOWN),
    ReplyCode.REPLYCODE: st.builds(ReplyWithCode, text),
    ReplyCode.QUARANTINE: st.builds(Quarantine, text),
    ReplyCode.ADDHEADER: st.builds(AddHeader, text, text),
    ReplyCode.INSHEADER: st.builds(InsertHeader, u32, text, text),
    ReplyCode.CHGHEADER: st.builds(ChangeHeader, u32, text, text),
    ReplyCode.ADDRCPT: st.builds(AddRecipient, text),
    ReplyCode.ADDRCPT_PAR: st.builds(AddRecipientExt, text, optional_text),
    ReplyCode.DELRCPT: st.builds(DeleteRecipient, text),
    ReplyCode.CHGFROM: st.builds(ChangeSender, text, optional_text),
    ReplyCode.REPLBODY: st.builds(ReplaceBody, raw),
}


def test_every_class_has_a_strategy() -> None:
    assert set(COMMANDS) == set(CommandCode)
    assert set(REPLIES) == set(ReplyCode) - {ReplyCode.SETSYMLIST, ReplyCode.CONN_FAIL}


# --- codec level -------------------------------------------------------------------


@pytest.mark.parametrize("code", list(COMMANDS), ids=[chr(c) for c in COMMANDS])
@SETTINGS
@given(data=st.data())
def test_command_codec_round_trip(code: int, data: st.DataObject) -> None:
    command = data.draw(COMMANDS[code])
    ((frame_code, payload),) = split_frames(command.encode())
    assert frame_code == code
    decoded = decode_command(frame_code, payload)
    assert decoded == command
    assert type(decoded) is type(command)
    assert decoded.encode() == command.encode()


@pytest.mark.parametrize("code", list(REPLIES), ids=[chr(c) for c in REPLIES])
@SETTINGS
@given(data=st.data())
def test_reply_codec_round_trip(code: int, data: st.DataObject) -> None:
    reply = data.draw(REPLIES[code])
    ((frame_code, payload),) = split_frames(reply.encode())
    assert frame_code == code
    decoded = decode_reply(frame_code, payload)
    assert decoded == reply
    assert type(decoded) is type(reply)
    assert decoded.encode() == reply.encode()


# --- through both roles: commands (MTA -> milter) ----------------------------------


class Pair:
    """An MTA and a milter connection wired together, the milter answering CONTINUE."""

    def __init__(self) -> None:
        actions, opts = ALL_ACTIONS, ProtocolOpts.SKIP
        self.mta = MtaConnection()
        self.milter = MilterConnection()
        offer = one_event(self.milter, self.mta.send(POSTFIX_OFFER))
        assert isinstance(offer, OptionNegotiation)
        wire = self.milter.accept_negotiation(negotiate(offer, actions, opts))
        feed_replies(self.mta, wire)

    def command(self, command: Command) -> Command | None:
        """Send ``command``; return the milter's event (None for absorbed macros)."""
        wire = self.mta.send(command)
        self.milter.receive_data(wire)
        event = self.milter.next_event()
        if command.code == CommandCode.MACRO:
            return None
        assert not isinstance(event, NeedData)
        return event

    def answer(self, reply: Reply = CONTINUE) -> list[Reply]:
        return feed_replies(self.mta, self.milter.send(reply))

    def run(self, *commands: Command) -> None:
        for command in commands:
            self.command(command)
            if self.milter.owed is not None:
                assert self.answer() == [CONTINUE]


CONNECT = Connect(b"h", AddressFamily.UNKNOWN)
MAIL = Mail((b"<a@b>",))
RCPT = Rcpt((b"<c@d>",))

# Commands that bring a fresh pair to where a command of each code is valid.
PREFIX: dict[int, tuple[Command, ...]] = {
    CommandCode.CONNECT: (),
    CommandCode.HELO: (CONNECT,),
    CommandCode.MAIL: (CONNECT,),
    CommandCode.RCPT: (CONNECT, MAIL),
    CommandCode.DATA: (CONNECT, MAIL, RCPT),
    CommandCode.HEADER: (CONNECT, MAIL, RCPT, DATA),
    CommandCode.EOH: (CONNECT, MAIL, RCPT, DATA),
    CommandCode.BODY: (CONNECT, MAIL, RCPT, DATA, END_OF_HEADERS),
    CommandCode.EOM: (CONNECT, MAIL, RCPT, DATA, END_OF_HEADERS),
    CommandCode.ABORT: (CONNECT, MAIL),
    CommandCode.QUIT: (CONNECT,),
    CommandCode.QUIT_NC: (CONNECT,),
    CommandCode.UNKNOWN: (CONNECT,),
}


@pytest.mark.parametrize("code", list(PREFIX), ids=[chr(c) for c in PREFIX])
@SETTINGS
@given(data=st.data())
def test_command_round_trip_through_the_roles(code: int, data: st.DataObject) -> None:
    command = data.draw(COMMANDS[code])
    pair = Pair()
    pair.run(*PREFIX[code])
    assert pair.command(command) == command
    # Every command that owes a reply is owed it on both sides.
    assert pair.milter.owed == pair.mta.awaiting


@SETTINGS
@given(offer=COMMANDS[CommandCode.OPTNEG])
def test_offer_round_trip_through_the_roles(offer: Command) -> None:
    assert isinstance(offer, OptionNegotiation)
    mta = MtaConnection()
    milter = MilterConnection()
    assert one_event(milter, mta.send(offer)) == offer
    assert milter.owed == mta.awaiting == CommandCode.OPTNEG


@SETTINGS
@given(
    stage=st.sampled_from("CHMRTNE"),
    pairs=st.lists(st.tuples(text.filter(bool), text), max_size=6),
)
def test_macro_round_trip_through_the_roles(stage: str, pairs: list[tuple[bytes, bytes]]) -> None:
    pair = Pair()
    pair.run(CONNECT)
    assert pair.command(DefineMacros(ord(stage), tuple(pairs))) is None
    # The last definition of a name wins; {x} and x are one macro.
    expected: dict[bytes, bytes] = {}
    for name, value in pairs:
        key = name[1:-1] if name[:1] == b"{" and name[-1:] == b"}" else name
        expected[key] = value
    assert pair.milter.macros.snapshot() == expected
    for name, _ in pairs:
        key = name[1:-1] if name[:1] == b"{" and name[-1:] == b"}" else name
        assert pair.milter.macros.get(name) == expected[key]


# --- through both roles: replies (milter -> MTA) -----------------------------------

# Where each reply is valid: the commands before it and the command it answers.
REPLY_AT: dict[int, tuple[Command, ...]] = {
    ReplyCode.CONTINUE: (CONNECT,),
    ReplyCode.ACCEPT: (CONNECT, MAIL),
    ReplyCode.REJECT: (CONNECT, MAIL, RCPT),
    ReplyCode.TEMPFAIL: (CONNECT, Helo(b"x")),
    ReplyCode.DISCARD: (CONNECT, MAIL, RCPT, DATA),
    ReplyCode.SKIP: (CONNECT, MAIL, RCPT, Body(b"x")),
    ReplyCode.SHUTDOWN: (CONNECT, MAIL, RCPT, DATA, Header(b"a", b"b")),
    ReplyCode.REPLYCODE: (CONNECT, Unknown(b"HELP")),
}
EOM_PATH = (CONNECT, MAIL, RCPT, DATA, END_OF_HEADERS, Body(b"x"), EndOfMessage())


NON_NEGOTIATION_REPLIES = [c for c in REPLIES if c != ReplyCode.OPTNEG]


@pytest.mark.parametrize(
    "code", NON_NEGOTIATION_REPLIES, ids=[chr(c) for c in NON_NEGOTIATION_REPLIES]
)
@SETTINGS
@given(data=st.data())
def test_reply_round_trip_through_the_roles(code: int, data: st.DataObject) -> None:
    if code == ReplyCode.REPLYCODE:
        reply: Reply = ReplyWithCode(data.draw(st.sampled_from([b"4", b"5"])) + data.draw(text))
    else:
        reply = data.draw(REPLIES[code])
    pair = Pair()
    commands = REPLY_AT.get(code, EOM_PATH)
    pair.run(*commands[:-1])
    pair.command(commands[-1])
    assert pair.milter.owed == pair.mta.awaiting == commands[-1].code
    assert pair.answer(reply) == [reply]
    if code in REPLY_AT:
        assert pair.mta.awaiting is None and pair.milter.owed is None
    else:
        # A modification or progress: the final reply is still owed on both sides.
        assert pair.milter.owed == pair.mta.awaiting == CommandCode.EOM
        assert pair.answer(ACCEPT) == [ACCEPT]
    assert pair.mta.state is pair.milter.state


@SETTINGS
@given(
    version=st.integers(2, 6),
    actions=st.integers(0, 0x1FF).map(Actions),
    opts=st.integers(0, 0x1FFFFF).map(ProtocolOpts),
    lists=st.dictionaries(st.sampled_from(MacroStage), text, max_size=7),
)
def test_negotiation_reply_round_trip_through_the_roles(
    version: int, actions: Actions, opts: ProtocolOpts, lists: dict[MacroStage, bytes]
) -> None:
    reply = OptionNegotiationReply(version, actions, opts, tuple(lists.items()))
    mta = MtaConnection()
    milter = MilterConnection()
    one_event(milter, mta.send(POSTFIX_OFFER))
    assert feed_replies(mta, milter.send(reply)) == [reply]
    assert mta.negotiated is not None and milter.negotiated is not None
    assert mta.negotiated == milter.negotiated
    assert mta.negotiated.opts == opts
    assert dict(mta.negotiated.macros) == lists
    assert mta.state is milter.state
