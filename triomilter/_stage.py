"""The stages a handler can run in, and how each maps onto the protocol.

One table ties a `Stage` to the command that starts it and, through the
engine's per-command tables, to the ``NO_*`` step that spares the MTA a stage
nobody handles and the ``NOREPLY_*`` step that lets a handler not answer.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from .protocol import NO_FLAG, NOREPLY_FLAG, CommandCode, ProtocolOpts


class Stage(enum.Enum):
    """The protocol stage a handler runs in."""

    NEGOTIATE = "negotiate"
    CONNECT = "connect"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    HEADER = "header"
    EOH = "eoh"
    BODY = "body"
    EOM = "eom"
    ABORT = "abort"
    CLOSE = "close"
    UNKNOWN = "unknown"

    # Members are singletons: identity hashing is exact and runs in C.
    __hash__ = object.__hash__


COMMAND_OF_STAGE = MappingProxyType(
    {
        Stage.NEGOTIATE: CommandCode.OPTNEG,
        Stage.CONNECT: CommandCode.CONNECT,
        Stage.HELO: CommandCode.HELO,
        Stage.MAIL: CommandCode.MAIL,
        Stage.RCPT: CommandCode.RCPT,
        Stage.DATA: CommandCode.DATA,
        Stage.HEADER: CommandCode.HEADER,
        Stage.EOH: CommandCode.EOH,
        Stage.BODY: CommandCode.BODY,
        Stage.EOM: CommandCode.EOM,
        Stage.ABORT: CommandCode.ABORT,
        Stage.UNKNOWN: CommandCode.UNKNOWN,
    }
)
"""The command that runs each stage's handler (on_close has none: it follows Q, K or a hang-up)."""

# Keyed by plain ints: the dispatcher looks a stage up for every command.
STAGE_OF_COMMAND: dict[int, Stage] = {
    int(code): stage
    for stage, code in COMMAND_OF_STAGE.items()
    if code in NO_FLAG  # the stages that are one command and one reply
}
"""Stages whose command just calls the handler and answers (not O, E, A, Q, K)."""

NO_STEP = MappingProxyType({stage: NO_FLAG[code] for code, stage in STAGE_OF_COMMAND.items()})
"""The ``NO_*`` step that stops the MTA from sending a stage."""

NOREPLY_STEP = MappingProxyType(
    {stage: NOREPLY_FLAG[code] for code, stage in STAGE_OF_COMMAND.items()}
)
"""The ``NOREPLY_*`` step that lets a stage go unanswered."""


def steps(stages: Iterable[Stage], table: Mapping[Stage, ProtocolOpts]) -> ProtocolOpts:
    """The union of ``table``'s steps for ``stages``."""
    opts = 0
    for stage in stages:
        opts |= int(table.get(stage, 0))
    return ProtocolOpts(opts)
