"""The negotiation policy, pure: ``Milter.negotiate(offer)`` without Trio or sockets.

What a milter asks of an MTA follows from its handlers: ``NO_*`` for the
stages it does not handle (only if offered: an MTA that cannot skip a stage
sends it and gets CONTINUE), ``NOREPLY_*`` for handlers annotated ``-> None``
(faked when not offered), and the macro lists Sendmail needs.
"""

from __future__ import annotations

import pytest

from triomilter import (
    Actions,
    Context,
    MacroStage,
    Milter,
    ProtocolOpts,
    Status,
    on_eoh,
    on_eom,
    on_header,
    on_rcpt,
)
from triomilter.protocol import (
    ALL_ACTIONS,
    ALL_PROTOCOL_OPTS,
    MilterConnection,
    OptionNegotiation,
)
from triomilter.testing import open_in_memory

P = ProtocolOpts

OFFERS = {
    # Postfix 3.x and Sendmail 8.14+: everything (protocol.md §4.1).
    "postfix-sendmail": OptionNegotiation(6, ALL_ACTIONS, ALL_PROTOCOL_OPTS),
    # An offer of 0 means libmilter's v1 defaults: actions 0x0F, steps 0x3F.
    "zero": OptionNegotiation(6, Actions(0), P(0)),
    # Postfix with milter_protocol=2: no NO_EOH, NO_UNKNOWN, NO_DATA, no NOREPLY.
    "v2": OptionNegotiation(2, ALL_ACTIONS, P(0x7F)),
    # An MTA-side client offering a reduced set: nothing to skip at all.
    "reduced": OptionNegotiation(6, Actions.ADD_HEADER, P.NONE),
}


@on_rcpt
async def rcpt(ctx: Context[None], args: list[str]) -> Status:
    return Status.CONTINUE


@on_header
async def header(ctx: Context[None], name: str, value: bytes) -> None:
    """Annotated -> None: never answers."""


@on_eom
async def eom(ctx: Context[None]) -> Status:
    return Status.CONTINUE


MILTER = Milter("policy", handlers=[rcpt, header, eom], actions=Actions.ADD_HEADER)


@pytest.mark.parametrize("offer", OFFERS.values(), ids=OFFERS)
def test_never_fails_for_a_stage_it_does_not_handle(offer: OptionNegotiation) -> None:
    negotiated = MILTER.negotiate(offer)
    offered = int(offer.opts) or 0x3F
    # Exactly the NO_* steps of unhandled stages that the MTA offers.
    assert negotiated.opts & MILTER.unhandled_steps == MILTER.unhandled_steps & offered
    assert not negotiated.opts & (P.NO_RCPT | P.NO_HEADER)  # handled stages are sent


@pytest.mark.parametrize("offer", OFFERS.values(), ids=OFFERS)
async def test_unhandled_stages_the_mta_sends_anyway_get_continue(offer: OptionNegotiation) -> None:
    async with open_in_memory(
        MILTER, actions=offer.actions, opts=offer.opts, version=offer.version
    ) as client:
        await client.connect("mx", None)
        await client.mail("<a@b>")
        assert (await client.rcpt("<c@d>")).status is Status.CONTINUE
        await client.data()
        await client.header("Subject", "hi")
        eoh_reply = await client.eoh()
        if client.negotiated_opts & P.NO_EOH:
            assert not eoh_reply.sent
        else:  # sent, though nobody handles it: answered CONTINUE
            assert eoh_reply.sent and eoh_reply.status is Status.CONTINUE
        result = await client.eom()
        assert result.status is Status.CONTINUE


def test_none_handlers_negotiate_noreply_when_offered_and_fake_it_otherwise() -> None:
    full = MILTER.negotiate(OFFERS["postfix-sendmail"])
    assert full.opts & P.NOREPLY_HEADER and not full.faked_noreply
    old = MILTER.negotiate(OFFERS["v2"])
    assert not old.opts & P.NOREPLY_HEADER  # not offered: not asked
    assert old.faked_noreply & P.NOREPLY_HEADER  # the dispatcher answers CONTINUE itself


def test_an_end_of_message_macro_list_brings_an_empty_end_of_headers_one() -> None:
    """Sendmail 8.17 honours a milter's EOM list only along with an EOH list."""
    milter = Milter("m", handlers=[eom], macros={MacroStage.EOM: "i {msg_id}"})
    macros = milter.negotiate(OFFERS["postfix-sendmail"]).macros
    assert macros == {MacroStage.EOM: b"i {msg_id}", MacroStage.EOH: b""}
    own_eoh = Milter("m", handlers=[eom], macros={MacroStage.EOM: "i", MacroStage.EOH: "j"})
    assert own_eoh.negotiate(OFFERS["postfix-sendmail"]).macros[MacroStage.EOH] == b"j"
    assert MacroStage.EOH not in Milter("m", handlers=[eom]).negotiate(OFFERS["zero"]).macros


def test_the_reply_an_mta_gets() -> None:
    """The policy's result is what goes on the wire (a real engine agrees)."""
    conn = MilterConnection()
    conn.receive_data(OFFERS["postfix-sendmail"].encode())
    offer = conn.next_event()
    assert isinstance(offer, OptionNegotiation)
    wire = conn.accept_negotiation(MILTER.negotiate(offer))
    # Every stage but RCPT, HEADER (and EOM, which cannot be skipped) negotiated away.
    expected = (
        P.NO_CONNECT | P.NO_HELO | P.NO_MAIL | P.NO_DATA | P.NO_EOH | P.NO_BODY | P.NO_UNKNOWN
    ) | P.NOREPLY_HEADER
    assert wire[9:13] == int(Actions.ADD_HEADER).to_bytes(4, "big")
    assert wire[13:17] == int(expected).to_bytes(4, "big")


@on_eoh
async def eoh(ctx: Context[None]) -> Status:
    return Status.CONTINUE


def test_the_default_negotiation_is_remembered_per_offer_and_bounded() -> None:
    milter = Milter("m", handlers=[eoh])
    first = milter.negotiate(OFFERS["postfix-sendmail"])
    assert milter.negotiate(OFFERS["postfix-sendmail"]) is first
    for opts in range(1000):  # a peer making up offers cannot grow the memo forever
        milter.negotiate(OptionNegotiation(6, ALL_ACTIONS, P(opts | 0x1FFF00)))
    assert len(milter._negotiations) <= 64
