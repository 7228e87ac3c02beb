"""The milter protocol engine (version 6): sans-IO, both roles, no Trio.

`MilterConnection` is the milter's side (commands in, replies out),
`MtaConnection` the MTA's (commands out, replies in). Both only turn bytes
into typed objects and back and enforce the protocol's rules; reading and
writing sockets is the caller's business.

``__all__`` is what a user of the engine needs. The other names importable
from here (framing, the macro store, the state table, negotiation helpers,
per-command flag tables) serve triomilter's own layers and may change.
"""

from ._commands import (
    ABORT,
    DATA,
    END_OF_HEADERS,
    QUIT,
    QUIT_NEW_CONNECTION,
    Abort,
    Body,
    Command,
    Connect,
    Data,
    DefineMacros,
    EndOfHeaders,
    EndOfMessage,
    Header,
    Helo,
    Mail,
    OptionNegotiation,
    Quit,
    QuitNewConnection,
    Rcpt,
    Unknown,
    decode_command,
)
from ._constants import (
    ALL_ACTIONS,
    ALL_PROTOCOL_OPTS,
    CHUNK_SIZE,
    MAX_DATA_SIZE,
    PROTOCOL_VERSION,
    Actions,
    AddressFamily,
    CommandCode,
    MacroStage,
    ProtocolOpts,
    ReplyCode,
)
from ._constants import (
    COMMAND_OF_MACRO_STAGE as COMMAND_OF_MACRO_STAGE,
)
from ._constants import (
    INTERNAL_PROTOCOL as INTERNAL_PROTOCOL,
)
from ._constants import (
    NO_FLAG as NO_FLAG,
)
from ._constants import (
    NO_STAGE_OPTS as NO_STAGE_OPTS,
)
from ._constants import (
    NOREPLY_FLAG as NOREPLY_FLAG,
)
from ._constants import (
    NOREPLY_OPTS as NOREPLY_OPTS,
)
from ._constants import (
    V1_ACTIONS as V1_ACTIONS,
)
from ._constants import (
    V2_PROTOCOL as V2_PROTOCOL,
)
from ._constants import command_name as command_name
from ._constants import reply_name as reply_name
from ._errors import LocalProtocolError, NegotiationError, ProtocolError, RemoteProtocolError
from ._framing import NEED_DATA, NeedData
from ._framing import FrameReader as FrameReader
from ._macros import MacroStore as MacroStore
from ._milter_role import MilterConnection
from ._mta_role import MtaConnection
from ._negotiation import Negotiated
from ._negotiation import check_reply as check_reply
from ._negotiation import negotiate as negotiate
from ._negotiation import negotiate_all as negotiate_all
from ._negotiation import offered as offered
from ._replies import (
    ACCEPT,
    CONTINUE,
    DISCARD,
    PROGRESS,
    REJECT,
    SHUTDOWN,
    SKIP,
    TEMPFAIL,
    Accept,
    AddHeader,
    AddRecipient,
    AddRecipientExt,
    ChangeHeader,
    ChangeSender,
    Continue,
    DeleteRecipient,
    Discard,
    InsertHeader,
    Modification,
    OptionNegotiationReply,
    Progress,
    Quarantine,
    Reject,
    ReplaceBody,
    Reply,
    ReplyWithCode,
    Shutdown,
    Skip,
    Tempfail,
    decode_reply,
)
from ._state import FINAL_REPLIES as FINAL_REPLIES
from ._state import State

__all__ = [
    "ABORT",
    "ACCEPT",
    "ALL_ACTIONS",
    "ALL_PROTOCOL_OPTS",
    "CHUNK_SIZE",
    "CONTINUE",
    "DATA",
    "DISCARD",
    "END_OF_HEADERS",
    "MAX_DATA_SIZE",
    "NEED_DATA",
    "PROGRESS",
    "PROTOCOL_VERSION",
    "QUIT",
    "QUIT_NEW_CONNECTION",
    "REJECT",
    "SHUTDOWN",
    "SKIP",
    "TEMPFAIL",
    "Abort",
    "Accept",
    "Actions",
    "AddHeader",
    "AddRecipient",
    "AddRecipientExt",
    "AddressFamily",
    "Body",
    "ChangeHeader",
    "ChangeSender",
    "Command",
    "CommandCode",
    "Connect",
    "Continue",
    "Data",
    "DefineMacros",
    "DeleteRecipient",
    "Discard",
    "EndOfHeaders",
    "EndOfMessage",
    "Header",
    "Helo",
    "InsertHeader",
    "LocalProtocolError",
    "MacroStage",
    "Mail",
    "MilterConnection",
    "Modification",
    "MtaConnection",
    "NeedData",
    "NegotiationError",
    "Negotiated",
    "OptionNegotiation",
    "OptionNegotiationReply",
    "Progress",
    "ProtocolError",
    "ProtocolOpts",
    "Quarantine",
    "Quit",
    "QuitNewConnection",
    "Rcpt",
    "Reject",
    "RemoteProtocolError",
    "ReplaceBody",
    "Reply",
    "ReplyCode",
    "ReplyWithCode",
    "Shutdown",
    "Skip",
    "State",
    "Tempfail",
    "Unknown",
    "decode_command",
    "decode_reply",
]
