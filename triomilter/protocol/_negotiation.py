"""Option negotiation for both roles (protocol.md §4).

The milter role narrows a milter's wishes against an MTA's offer with
libmilter's rules; the MTA role checks a milter's reply against its own offer.
Both produce a `Negotiated`, the single record of what the session agreed.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from ._commands import OptionNegotiation
from ._constants import (
    ALL_ACTIONS,
    ALL_PROTOCOL_OPTS,
    INTERNAL_PROTOCOL,
    NO_STAGE_OPTS,
    NOREPLY_OPTS,
    PROTOCOL_VERSION,
    V1_ACTIONS,
    V2_PROTOCOL,
    Actions,
    MacroStage,
    ProtocolOpts,
)
from ._errors import NegotiationError, RemoteProtocolError
from ._replies import OptionNegotiationReply

# libmilter drops these instead of failing when an old MTA does not offer them:
# such an MTA never sends the event anyway.
_DROPPABLE = NOREPLY_OPTS | ProtocolOpts.NO_DATA | ProtocolOpts.NO_UNKNOWN
_DROPPABLE_BITS = int(_DROPPABLE)
_NOREPLY_BITS = int(NOREPLY_OPTS)
_INTERNAL = int(INTERNAL_PROTOCOL)
_V1_ACTIONS = int(V1_ACTIONS)
_V2_PROTOCOL = int(V2_PROTOCOL)
_ALL_ACTIONS = int(ALL_ACTIONS)
_KNOWN_PROTOCOL = int(ALL_PROTOCOL_OPTS) | _INTERNAL


def _without(value: int, mask: int) -> int:
    """``value`` with the bits of ``mask`` cleared, over all 32 bits.

    Not ``value & ~mask`` on the flag types: ``~`` of an ``IntFlag`` only
    inverts the bits the enum defines (``~Actions(0x1FF)`` is 0), so bits an
    MTA or a milter sends beyond them would slip through every check.
    """
    return int(value) & ~int(mask)


@attrs.frozen
class Negotiated:
    """What a session agreed on.

    ``faked_noreply`` holds the ``NOREPLY_*`` steps the milter asked for but
    the MTA did not offer: on the wire they are ordinary replying stages, and
    a handler's "no reply" is answered CONTINUE for it (as libmilter does).
    """

    version: int = PROTOCOL_VERSION
    actions: Actions = Actions.NONE
    opts: ProtocolOpts = ProtocolOpts.NONE
    macros: Mapping[MacroStage, bytes] = attrs.field(factory=dict)
    faked_noreply: ProtocolOpts = ProtocolOpts.NONE

    def reply(self) -> OptionNegotiationReply:
        """The milter's ``O`` reply that states this agreement (macro lists by stage number)."""
        return OptionNegotiationReply(
            self.version, self.actions, self.opts, tuple(sorted(self.macros.items()))
        )


def offered(offer: OptionNegotiation) -> tuple[Actions, ProtocolOpts]:
    """The offer's actions and steps, with libmilter's defaults for a zero word.

    Bits that version 6 does not define are dropped: they mean nothing to a
    milter, and a handler must not see what a hostile peer made up.
    """
    actions = int(offer.actions) or _V1_ACTIONS
    opts = int(offer.opts) or _V2_PROTOCOL
    return Actions(actions & _ALL_ACTIONS), ProtocolOpts(opts & _KNOWN_PROTOCOL)


def negotiate(
    offer: OptionNegotiation,
    actions: Actions,
    opts: ProtocolOpts,
    macros: Mapping[MacroStage, bytes] | None = None,
) -> Negotiated:
    """Narrow a milter's wishes against the MTA's offer (libmilter's rules).

    - version: the lower of the offer's and ours; an offer below 2 fails;
    - actions: every requested action must be offered, else `NegotiationError`
      ("does not fulfill action requirements");
    - steps: ``NOREPLY_*`` not offered are dropped and faked, ``NO_DATA`` and
      ``NO_UNKNOWN`` not offered are dropped, any other step not offered fails;
      the MTA-internal bits are never sent.
    """
    if offer.version < 2:
        raise NegotiationError(f"OPTNEG: MTA protocol version {offer.version} is below 2")
    # Plain ints throughout (IntFlag operators run in Python; this runs for
    # every MTA connection); flags are built once for the result.
    mta_actions = int(offer.actions) or _V1_ACTIONS
    mta_opts = int(offer.opts) or _V2_PROTOCOL
    missing = int(actions) & ~mta_actions
    if missing:
        raise NegotiationError(
            f"OPTNEG: the MTA does not offer the actions the milter needs: {Actions(missing)!r} "
            f"(offered {Actions(mta_actions)!r})"
        )
    wanted = int(opts) & ~_INTERNAL
    unoffered = wanted & ~mta_opts
    fatal = unoffered & ~_DROPPABLE_BITS
    if fatal:
        raise NegotiationError(
            "OPTNEG: the MTA does not offer the protocol steps the milter needs: "
            f"{ProtocolOpts(fatal)!r}"
        )
    return Negotiated(
        version=min(PROTOCOL_VERSION, offer.version),
        actions=Actions(actions),
        opts=ProtocolOpts(wanted & mta_opts),
        macros=dict(macros) if macros else {},
        faked_noreply=ProtocolOpts(unoffered & _NOREPLY_BITS),
    )


def negotiate_all(
    offer: OptionNegotiation,
    unhandled: ProtocolOpts,
    macros: Mapping[MacroStage, bytes] | None = None,
) -> Negotiated:
    """libmilter's ``SMFIS_ALL_OPTS``: every offered action, and as steps the
    ``NO_*`` bits of stages nobody handles plus SKIP if offered (never a
    ``NOREPLY_*`` or REJECTED_RCPT)."""
    mta_actions, mta_opts = offered(offer)
    opts = (unhandled & NO_STAGE_OPTS) | (mta_opts & ProtocolOpts.SKIP)
    return negotiate(offer, mta_actions, ProtocolOpts(opts & (mta_opts | _DROPPABLE)), macros)


def check_reply(offer: OptionNegotiation, reply: OptionNegotiationReply) -> Negotiated:
    """MTA role: accept a milter's ``O`` reply only if it fits our offer.

    Strict like Sendmail (Postfix checks only the actions): a version above
    ours or below 2, an action or a step we did not offer, or a macro list
    for a stage twice is a `RemoteProtocolError`.
    """
    if reply.version > offer.version or reply.version < 2:
        raise RemoteProtocolError(
            f"OPTNEG reply: version {reply.version} does not fit the offered {offer.version}"
        )
    # The raw words: bits version 6 does not define pass if they were offered.
    mta_actions = int(offer.actions) or _V1_ACTIONS
    mta_opts = int(offer.opts) or _V2_PROTOCOL
    extra_actions = Actions(_without(reply.actions, mta_actions))
    if extra_actions:
        raise RemoteProtocolError(f"OPTNEG reply: actions not offered: {extra_actions!r}")
    extra_opts = ProtocolOpts(_without(reply.opts, mta_opts | INTERNAL_PROTOCOL))
    if extra_opts:
        raise RemoteProtocolError(f"OPTNEG reply: protocol steps not offered: {extra_opts!r}")
    macros: dict[MacroStage, bytes] = {}
    for stage, names in reply.macros:
        if stage in macros:
            raise RemoteProtocolError(f"OPTNEG reply: two macro lists for stage {stage.name}")
        macros[stage] = names
    return Negotiated(
        version=reply.version,
        actions=reply.actions,
        opts=ProtocolOpts(_without(reply.opts, INTERNAL_PROTOCOL)),
        macros=macros,
    )
