"""triomilter: typed, pure-Python mail filters (milters) for Postfix and Sendmail, on Trio.

Write ordinary typed functions, decorate them with the stage they handle,
collect them in a `Milter`, and run it with ``trio.run(triomilter.serve, milter,
"inet:8894@127.0.0.1")`` or the ``triomilter serve`` command. Annotations
choose the argument types (``str`` is UTF-8 text, ``bytes`` the raw bytes) and
the failure semantics (``Status`` or ``Result[Status]``).
"""

from typing import TYPE_CHECKING

from ._context import Context, ContextApi, SocketFamily, SocketInfo
from ._errors import (
    ActionNotNegotiated,
    ConnectionLost,
    ForcedShutdown,
    InvalidArgument,
    MacroDecodeError,
    MilterError,
    MilterPanic,
    StageError,
)
from ._handlers import (
    Handler,
    blocking,
    on_abort,
    on_body,
    on_close,
    on_connect,
    on_data,
    on_eoh,
    on_eom,
    on_header,
    on_helo,
    on_mail,
    on_negotiate,
    on_rcpt,
    on_unknown,
)
from ._metrics import Metrics
from ._milter import Milter
from ._options import ServerOptions
from ._stage import Stage
from ._status import Err, Ok, Result, Status
from .protocol import Actions, MacroStage, ProtocolOpts

if TYPE_CHECKING:
    from ._server import serve, serve_listener
    from ._sockets import SocketSpecError
    from ._tasks import ConnectionTasks

__version__ = "0.1.0"

__all__ = [
    "ActionNotNegotiated",
    "Actions",
    "ConnectionLost",
    "ConnectionTasks",
    "Context",
    "ContextApi",
    "Err",
    "ForcedShutdown",
    "Handler",
    "InvalidArgument",
    "MacroDecodeError",
    "MacroStage",
    "Metrics",
    "Milter",
    "MilterError",
    "MilterPanic",
    "Ok",
    "ProtocolOpts",
    "Result",
    "ServerOptions",
    "SocketFamily",
    "SocketInfo",
    "SocketSpecError",
    "Stage",
    "StageError",
    "Status",
    "blocking",
    "on_abort",
    "on_body",
    "on_close",
    "on_connect",
    "on_data",
    "on_eoh",
    "on_eom",
    "on_header",
    "on_helo",
    "on_mail",
    "on_negotiate",
    "on_rcpt",
    "on_unknown",
    "serve",
    "serve_listener",
]


def __getattr__(name: str) -> object:
    # The server needs Trio's sockets and signals; the rest of the package (and
    # above all the protocol engine, `triomilter.protocol`) must import without
    # Trio, so what needs Trio is loaded on first use.
    if name in ("serve", "serve_listener"):
        from . import _server

        return getattr(_server, name)
    if name == "SocketSpecError":
        from ._sockets import SocketSpecError

        return SocketSpecError
    if name == "ConnectionTasks":
        from ._tasks import ConnectionTasks

        return ConnectionTasks
    raise AttributeError(f"module 'triomilter' has no attribute {name!r}")
