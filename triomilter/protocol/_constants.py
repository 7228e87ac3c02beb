"""Wire constants of milter protocol version 6 (protocol.md §2).

Every value here is the exact number libmilter's ``mfdef.h``/``mfapi.h`` use.
Command and reply codes are ``IntEnum``s of the code byte, so a frame's code
(an ``int`` from indexing ``bytes``) compares equal to them without conversion.
"""

from __future__ import annotations

import enum

PROTOCOL_VERSION = 6
"""The protocol version this engine speaks (``SMFI_PROT_VERSION``)."""

MAX_DATA_SIZE = 65535
"""Default limit on a packet's data bytes (``MILTER_MAX_DATA_SIZE``), both directions."""

CHUNK_SIZE = 65535
"""Largest body chunk an MTA sends or a milter may send back (``MILTER_CHUNK_SIZE``)."""


class CommandCode(enum.IntEnum):
    """Codes of the commands an MTA sends (``SMFIC_*``)."""

    OPTNEG = ord("O")
    MACRO = ord("D")
    CONNECT = ord("C")
    HELO = ord("H")
    MAIL = ord("M")
    RCPT = ord("R")
    DATA = ord("T")
    HEADER = ord("L")
    EOH = ord("N")
    BODY = ord("B")
    EOM = ord("E")  # SMFIC_BODYEOB
    ABORT = ord("A")
    QUIT = ord("Q")
    QUIT_NC = ord("K")
    UNKNOWN = ord("U")


class ReplyCode(enum.IntEnum):
    """Codes of the packets a milter sends (``SMFIR_*``)."""

    OPTNEG = ord("O")
    CONTINUE = ord("c")
    ACCEPT = ord("a")
    REJECT = ord("r")
    TEMPFAIL = ord("t")
    DISCARD = ord("d")
    REPLYCODE = ord("y")
    SKIP = ord("s")
    PROGRESS = ord("p")
    QUARANTINE = ord("q")
    ADDHEADER = ord("h")
    INSHEADER = ord("i")
    CHGHEADER = ord("m")
    ADDRCPT = ord("+")
    ADDRCPT_PAR = ord("2")
    DELRCPT = ord("-")
    CHGFROM = ord("e")
    REPLBODY = ord("b")
    SETSYMLIST = ord("l")
    SHUTDOWN = ord("4")
    CONN_FAIL = ord("f")


class AddressFamily(enum.IntEnum):
    """Address family byte of the ``C`` (connect) command."""

    UNKNOWN = ord("U")
    UNIX = ord("L")
    INET = ord("4")
    INET6 = ord("6")


_PSEUDO_MEMBERS = 512
"""How many combined values a flag type caches (see `_BoundedFlag`)."""


class _BoundedFlag(enum.IntFlag):
    """An ``IntFlag`` whose cache of combined values has a bound.

    ``enum`` keeps every combination of known bits it ever built for the life
    of the process. Negotiation words come from the network: a peer sending
    random words would grow that cache without end (2**21 combinations of the
    protocol bits alone). Beyond the bound, combinations are built afresh
    each time instead of cached; they compare and hash like any int.
    """

    @classmethod
    def _missing_(cls, value: object) -> enum.Flag:
        member: enum.Flag = super()._missing_(value)
        if len(cls._value2member_map_) > _PSEUDO_MEMBERS:
            cls._value2member_map_.pop(value, None)
        return member


class Actions(_BoundedFlag):
    """What a milter may do at end of message (``SMFIF_*``, the negotiated actions word)."""

    NONE = 0
    ADD_HEADER = 0x001  # SMFIF_ADDHDRS: add and insert headers
    REPLACE_BODY = 0x002  # SMFIF_CHGBODY
    ADD_RECIPIENT = 0x004  # SMFIF_ADDRCPT
    REMOVE_RECIPIENT = 0x008  # SMFIF_DELRCPT
    REPLACE_HEADER = 0x010  # SMFIF_CHGHDRS: change and delete headers
    QUARANTINE = 0x020  # SMFIF_QUARANTINE
    REPLACE_SENDER = 0x040  # SMFIF_CHGFROM
    ADD_RECIPIENT_EXT = 0x080  # SMFIF_ADDRCPT_PAR: add recipients with ESMTP args
    REQUEST_MACROS = 0x100  # SMFIF_SETSYMLIST: macro lists in the negotiation reply


class ProtocolOpts(_BoundedFlag):
    """Negotiated protocol steps (``SMFIP_*``, the negotiated protocol word)."""

    NONE = 0
    NO_CONNECT = 0x00000001
    NO_HELO = 0x00000002
    NO_MAIL = 0x00000004
    NO_RCPT = 0x00000008
    NO_BODY = 0x00000010
    NO_HEADER = 0x00000020
    NO_EOH = 0x00000040
    NOREPLY_HEADER = 0x00000080
    NO_UNKNOWN = 0x00000100
    NO_DATA = 0x00000200
    SKIP = 0x00000400
    REJECTED_RCPT = 0x00000800
    NOREPLY_CONNECT = 0x00001000
    NOREPLY_HELO = 0x00002000
    NOREPLY_MAIL = 0x00004000
    NOREPLY_RCPT = 0x00008000
    NOREPLY_DATA = 0x00010000
    NOREPLY_UNKNOWN = 0x00020000
    NOREPLY_EOH = 0x00040000
    NOREPLY_BODY = 0x00080000
    HEADER_LEADING_SPACE = 0x00100000
    MDS_256K = 0x10000000
    MDS_1M = 0x20000000


class MacroStage(enum.IntEnum):
    """Stage numbers of macro lists in the negotiation reply (``SMFIM_*``).

    EOH was added after EOM, so the wire numbers are out of protocol order.
    """

    CONNECT = 0
    HELO = 1
    MAIL = 2
    RCPT = 3
    DATA = 4
    EOM = 5
    EOH = 6


# Groupings used by negotiation and the state machine.
V1_ACTIONS = Actions(0x0F)
"""Actions assumed when an MTA offers 0 (libmilter ``SMFI_V1_ACTS``)."""
V2_PROTOCOL = ProtocolOpts(0x3F)
"""Protocol steps assumed when an MTA offers 0 (libmilter ``SMFI_V1_PROT``)."""
ALL_ACTIONS = Actions(0x1FF)
"""Every action of version 6 (``SMFI_CURR_ACTS``): what Postfix and Sendmail offer."""
ALL_PROTOCOL_OPTS = ProtocolOpts(0x001FFFFF)
"""Every protocol step of version 6 (``SMFI_CURR_PROT``): what Postfix and Sendmail offer."""
ALL_PROTOCOL = ALL_PROTOCOL_OPTS
INTERNAL_PROTOCOL = ProtocolOpts(0x70000000)
"""Bits private to an MTA and libmilter (max data size); never negotiated here."""

NO_STAGE_OPTS = (
    ProtocolOpts.NO_CONNECT
    | ProtocolOpts.NO_HELO
    | ProtocolOpts.NO_MAIL
    | ProtocolOpts.NO_RCPT
    | ProtocolOpts.NO_BODY
    | ProtocolOpts.NO_HEADER
    | ProtocolOpts.NO_EOH
    | ProtocolOpts.NO_UNKNOWN
    | ProtocolOpts.NO_DATA
)
NOREPLY_OPTS = (
    ProtocolOpts.NOREPLY_CONNECT
    | ProtocolOpts.NOREPLY_HELO
    | ProtocolOpts.NOREPLY_MAIL
    | ProtocolOpts.NOREPLY_RCPT
    | ProtocolOpts.NOREPLY_DATA
    | ProtocolOpts.NOREPLY_HEADER
    | ProtocolOpts.NOREPLY_EOH
    | ProtocolOpts.NOREPLY_BODY
    | ProtocolOpts.NOREPLY_UNKNOWN
)

# Which NO_* flag disables, and which NOREPLY_* flag silences, each command.
NO_FLAG: dict[int, ProtocolOpts] = {
    CommandCode.CONNECT: ProtocolOpts.NO_CONNECT,
    CommandCode.HELO: ProtocolOpts.NO_HELO,
    CommandCode.MAIL: ProtocolOpts.NO_MAIL,
    CommandCode.RCPT: ProtocolOpts.NO_RCPT,
    CommandCode.DATA: ProtocolOpts.NO_DATA,
    CommandCode.HEADER: ProtocolOpts.NO_HEADER,
    CommandCode.EOH: ProtocolOpts.NO_EOH,
    CommandCode.BODY: ProtocolOpts.NO_BODY,
    CommandCode.UNKNOWN: ProtocolOpts.NO_UNKNOWN,
}
NOREPLY_FLAG: dict[int, ProtocolOpts] = {
    CommandCode.CONNECT: ProtocolOpts.NOREPLY_CONNECT,
    CommandCode.HELO: ProtocolOpts.NOREPLY_HELO,
    CommandCode.MAIL: ProtocolOpts.NOREPLY_MAIL,
    CommandCode.RCPT: ProtocolOpts.NOREPLY_RCPT,
    CommandCode.DATA: ProtocolOpts.NOREPLY_DATA,
    CommandCode.HEADER: ProtocolOpts.NOREPLY_HEADER,
    CommandCode.EOH: ProtocolOpts.NOREPLY_EOH,
    CommandCode.BODY: ProtocolOpts.NOREPLY_BODY,
    CommandCode.UNKNOWN: ProtocolOpts.NOREPLY_UNKNOWN,
}

# The command each macro stage's ``D`` packet names (protocol.md §2.5, §5.1).
COMMAND_OF_MACRO_STAGE: dict[MacroStage, CommandCode] = {
    MacroStage.CONNECT: CommandCode.CONNECT,
    MacroStage.HELO: CommandCode.HELO,
    MacroStage.MAIL: CommandCode.MAIL,
    MacroStage.RCPT: CommandCode.RCPT,
    MacroStage.DATA: CommandCode.DATA,
    MacroStage.EOH: CommandCode.EOH,
    MacroStage.EOM: CommandCode.EOM,
}

# The action each modification reply needs (protocol.md §2.3).
ACTION_OF_REPLY: dict[int, Actions] = {
    ReplyCode.ADDHEADER: Actions.ADD_HEADER,
    ReplyCode.INSHEADER: Actions.ADD_HEADER,
    ReplyCode.CHGHEADER: Actions.REPLACE_HEADER,
    ReplyCode.ADDRCPT: Actions.ADD_RECIPIENT,
    ReplyCode.ADDRCPT_PAR: Actions.ADD_RECIPIENT_EXT,
    ReplyCode.DELRCPT: Actions.REMOVE_RECIPIENT,
    ReplyCode.CHGFROM: Actions.REPLACE_SENDER,
    ReplyCode.REPLBODY: Actions.REPLACE_BODY,
    ReplyCode.QUARANTINE: Actions.QUARANTINE,
}


def command_name(code: int) -> str:
    """A readable name for a command code, also for codes that are not commands."""
    try:
        return f"{CommandCode(code).name} ({chr(code)!r})"
    except ValueError:
        return f"unknown command {bytes([code])!r}"


def reply_name(code: int) -> str:
    """A readable name for a reply code, also for codes that are not replies."""
    try:
        return f"{ReplyCode(code).name} ({chr(code)!r})"
    except ValueError:
        return f"unknown reply {bytes([code])!r}"
