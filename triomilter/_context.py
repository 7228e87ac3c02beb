"""The context handed to every handler: per-connection data and the context API (SPEC §2.3).

A `Context` belongs to one MTA connection, but it does not know the
dispatcher: it talks to a `ContextHost`, the few things a context needs of
its connection. The dispatcher's session is one host, `HandlerContext` (a
test double that records instead of sending) another.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Generic, Protocol

import attrs
from typing_extensions import TypeVar

from ._errors import ActionNotNegotiated, InvalidArgument, StageError
from ._stage import Stage
from .protocol import (
    CHUNK_SIZE,
    Actions,
    AddHeader,
    AddRecipient,
    AddRecipientExt,
    ChangeHeader,
    ChangeSender,
    DeleteRecipient,
    InsertHeader,
    MacroStage,
    Modification,
    Progress,
    Quarantine,
    ReplaceBody,
)
from .protocol import PROGRESS as _PROGRESS

if TYPE_CHECKING:
    from ._tasks import ConnectionTasks

D = TypeVar("D", default=None)
M = TypeVar("M", default=None)


class SocketFamily(enum.StrEnum):
    """The SMTP client's address family, as the MTA reported it."""

    INET = "inet"
    INET6 = "inet6"
    UNIX = "unix"


@attrs.frozen
class SocketInfo:
    """The SMTP client's address: IP text and port, or a UNIX socket path (port 0)."""

    family: SocketFamily
    address: str
    port: int = 0


# --- argument validation -------------------------------------------------------

_HEADER_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")  # RFC 5322 ftext: printable, no colon
_REPLY_CODE = re.compile(r"[45][0-9][0-9]")
_EXT_CODE = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
MAX_REPLY_LINES = 32
MAX_REPLY_LINE = 980
_U32_MAX = 0xFFFFFFFF


def _to_bytes(value: str | bytes, what: str) -> bytes:
    if isinstance(value, str):
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidArgument(f"{what} cannot be encoded as UTF-8: {exc}") from None
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise InvalidArgument(f"{what} must be str or bytes, not {type(value).__name__}")


def _plain(value: str | bytes, what: str, *, empty: bool = False) -> bytes:
    """A one-line string: no NUL, CR or LF."""
    data = _to_bytes(value, what)
    if not data and not empty:
        raise InvalidArgument(f"{what} must not be empty")
    for bad, name in ((b"\0", "a NUL byte"), (b"\r", "CR"), (b"\n", "LF")):
        if bad in data:
            raise InvalidArgument(f"{what} must not contain {name}: {data[:80]!r}")
    return data


def _header_name(name: str | bytes) -> bytes:
    data = _to_bytes(name, "header name")
    if not _HEADER_NAME.fullmatch(data):
        raise InvalidArgument(
            f"header name must be printable ASCII without spaces or ':': {data[:80]!r}"
        )
    return data


def _header_value(value: str | bytes) -> bytes:
    """A header value: no NUL or CR; LF only to fold (followed by a space or tab)."""
    data = _to_bytes(value, "header value")
    if b"\0" in data or b"\r" in data:
        raise InvalidArgument(f"header value must not contain NUL or CR: {data[:80]!r}")
    pos = data.find(b"\n")
    while pos >= 0:
        if data[pos + 1 : pos + 2] not in (b" ", b"\t"):
            raise InvalidArgument(
                "header value: a line break must be a fold (LF followed by a space or tab), "
                f"never CRLF or a bare LF: {data[:80]!r}"
            )
        pos = data.find(b"\n", pos + 1)
    return data


def _index(index: int, what: str, minimum: int) -> int:
    if isinstance(index, bool) or not isinstance(index, int):
        raise InvalidArgument(f"{what} must be an int, not {type(index).__name__}")
    if not minimum <= index <= _U32_MAX:
        raise InvalidArgument(f"{what} must be between {minimum} and {_U32_MAX}, got {index}")
    return index


def build_error_reply(code: str | int, ext_code: str | None, lines: str | Sequence[str]) -> bytes:
    """Validate and format a custom SMTP reply as libmilter's smfi_set(ml)reply does."""
    code_text = str(code)
    if not _REPLY_CODE.fullmatch(code_text):
        raise InvalidArgument(f"reply code must be 4xx or 5xx, got {code!r}")
    if ext_code is not None:
        if not isinstance(ext_code, str) or not _EXT_CODE.fullmatch(ext_code):
            raise InvalidArgument(f"extended code must look like 5.7.1, got {ext_code!r}")
        if ext_code[0] != code_text[0]:
            raise InvalidArgument(
                f"extended code {ext_code} does not match the class of reply code {code_text}"
            )
    texts = [lines] if isinstance(lines, str) else list(lines)
    encoded = _reply_lines(texts)
    head = code_text.encode()
    if len(encoded) == 1:
        if not ext_code:
            first = encoded[0][:1]
            if first.isdigit() and first != head[:1]:
                # Postfix takes a digit after "ddd " for the extended code's
                # class and refuses a mismatch as a "malformed reply".
                raise InvalidArgument(
                    f"reply text {texts[0][:40]!r} starts with a digit that is not the class "
                    f"of reply code {code_text}: pass an extended code"
                )
            # Always "ddd SP", like libmilter: Postfix refuses a bare "ddd".
            return head + b" " + encoded[0]
        return head + b" " + ext_code.encode() + (b" " + encoded[0] if encoded[0] else b"")
    ext = (ext_code or f"{code_text[0]}.0.0").encode()
    out = [head + b"-" + ext + b" " + line for line in encoded[:-1]]
    out.append(head + b" " + ext + b" " + encoded[-1])
    return b"\r\n".join(out)


def _reply_lines(texts: list[str]) -> list[bytes]:
    """The lines of a custom reply, checked and with ``%`` escaped."""
    if not texts:
        raise InvalidArgument("a reply needs at least one line")
    if len(texts) > MAX_REPLY_LINES:
        raise InvalidArgument(f"a reply has at most {MAX_REPLY_LINES} lines, got {len(texts)}")
    encoded: list[bytes] = []
    for text in texts:
        if not isinstance(text, str):
            raise InvalidArgument(f"reply lines must be str, not {type(text).__name__}")
        line = _plain(text, "reply line", empty=True)
        if len(text) > MAX_REPLY_LINE:
            raise InvalidArgument(f"a reply line has at most {MAX_REPLY_LINE} characters")
        # Sendmail treats the text as a format string; Postfix turns %% into %.
        encoded.append(line.replace(b"%", b"%%"))
    return encoded


class ContextHost(Protocol):
    """What a `Context` needs of the MTA connection it belongs to."""

    error_reply: bytes | None
    """The custom SMTP reply set for the status the running handler returns."""

    @property
    def stage(self) -> Stage:
        """The stage whose handler runs now."""
        ...

    @property
    def connection_id(self) -> str: ...

    @property
    def actions(self) -> Actions:
        """The actions the MTA granted."""
        ...

    @property
    def in_message(self) -> bool:
        """Whether a message is open (between its first stage and its end)."""
        ...

    @property
    def panicked(self) -> bool:
        """Whether a handler panicked anywhere: then nothing may be sent."""
        ...

    @property
    def requested_macros(self) -> dict[MacroStage, bytes]:
        """Macro lists asked for in on_negotiate (filled by ``request_macros``)."""
        ...

    @property
    def tasks(self) -> ConnectionTasks | None:
        """Background tasks of the connection, if it has any."""
        ...

    def macro(self, name: bytes) -> bytes | None:
        """The value of macro ``name`` (``x`` or ``{x}``) as the MTA last sent it."""
        ...

    async def queue(self, change: Modification | Progress, flush: bool = False) -> None:
        """Send ``change`` with the final reply (or at once with ``flush``)."""
        ...


class ContextApi:
    """What a handler can ask of the MTA connection (SPEC §2.3).

    End-of-message actions are validated when called and raise a
    `MilterError` subclass without sending anything if they are not allowed.
    Valid ones are queued at once and written together with the final reply
    of the stage (one write, no Nagle stall); `signal_progress` and a large
    queue are written immediately.
    """

    __slots__ = ("_host",)

    def __init__(self, host: ContextHost) -> None:
        self._host = host

    # --- macros -----------------------------------------------------------------

    def macro_bytes(self, name: str | bytes) -> bytes | None:
        """The raw value of macro ``name`` (``"i"`` and ``"{i}"`` are the same), or None."""
        # Names are ASCII; another str is simply no macro's name (not an exception).
        key = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else name
        return self._host.macro(key)

    def macro_value(self, name: str | bytes) -> str | None:
        """The value of macro ``name`` as text, or None.

        Never fails: bytes that are not UTF-8 (a client's reverse DNS name,
        say, which anyone controls) become U+FFFD. Use `macro_bytes` for the
        exact bytes.
        """
        value = self.macro_bytes(name)
        if value is None:
            return None
        return value.decode("utf-8", "replace")

    def request_macros(self, stage: MacroStage, names: str) -> None:
        """Ask the MTA to send macros ``names`` (space-separated) at ``stage``.

        Only in ``on_negotiate``; once per stage (a second call replaces the
        list). Postfix ignores an empty list.
        """
        self._require_stage(Stage.NEGOTIATE, "request_macros")
        if not isinstance(stage, MacroStage):
            raise InvalidArgument(f"stage must be a MacroStage, not {stage!r}")
        data = _plain(names, "macro names", empty=True)
        self._host.requested_macros[stage] = b" ".join(data.split())

    # --- replies ---------------------------------------------------------------

    def set_error_reply(
        self, code: str | int, ext_code: str | None, lines: str | Sequence[str]
    ) -> None:
        """Use this SMTP reply if the handler then returns REJECT (5xx) or TEMPFAIL (4xx).

        ``lines`` is one line or a list (multi-line reply, at most 32 lines of at
        most 980 characters, no CR/LF). ``%`` is sent literally. The reply applies
        to the status the current handler returns and is forgotten afterwards.
        """
        self._host.error_reply = build_error_reply(code, ext_code, lines)

    # --- end-of-message actions --------------------------------------------------

    def _require_stage(self, stage: Stage, what: str) -> None:
        current = self._host.stage
        if current is not stage:
            raise StageError(
                f"{what}() is allowed in on_{stage.value} only, not in on_{current.value}"
            )

    def _check_action(self, action: Actions, what: str) -> None:
        self._require_stage(Stage.EOM, what)
        if self._host.panicked:
            raise StageError("the milter is shutting down after a panic")
        if not self._host.actions & action:
            raise ActionNotNegotiated(
                f"{what} needs the {action.name} action; add it to Milter(actions=...) "
                "or request it in on_negotiate (the MTA must offer it)"
            )

    async def add_header(self, name: str | bytes, value: str | bytes) -> None:
        """Append a header to the message."""
        self._check_action(Actions.ADD_HEADER, "add_header")
        await self._host.queue(AddHeader(_header_name(name), _header_value(value)))

    async def insert_header(self, index: int, name: str | bytes, value: str | bytes) -> None:
        """Insert a header at position ``index`` (0 = first)."""
        self._check_action(Actions.ADD_HEADER, "insert_header")
        index = _index(index, "header index", 0)
        await self._host.queue(InsertHeader(index, _header_name(name), _header_value(value)))

    async def replace_header(
        self, name: str | bytes, index: int, value: str | bytes | None
    ) -> None:
        """Replace the ``index``-th (1-based) header ``name``; ``None`` deletes it."""
        self._check_action(Actions.REPLACE_HEADER, "replace_header")
        data = b"" if value is None else _header_value(value)
        if value is not None and not data:
            raise InvalidArgument("an empty value would delete the header: pass None for that")
        index = _index(index, "header index", 1)
        await self._host.queue(ChangeHeader(index, _header_name(name), data))

    async def add_recipient(self, rcpt: str | bytes, esmtp_args: str | bytes | None = None) -> None:
        """Add an envelope recipient; ESMTP args need ``ADD_RECIPIENT_EXT``."""
        if esmtp_args is None:
            self._check_action(Actions.ADD_RECIPIENT, "add_recipient")
            await self._host.queue(AddRecipient(_plain(rcpt, "recipient")))
        else:
            self._check_action(Actions.ADD_RECIPIENT_EXT, "add_recipient")
            args = _plain(esmtp_args, "ESMTP arguments")
            await self._host.queue(AddRecipientExt(_plain(rcpt, "recipient"), args))

    async def remove_recipient(self, rcpt: str | bytes) -> None:
        """Remove an envelope recipient (as the client gave it, e.g. ``<a@b>``)."""
        self._check_action(Actions.REMOVE_RECIPIENT, "remove_recipient")
        await self._host.queue(DeleteRecipient(_plain(rcpt, "recipient")))

    async def replace_sender(
        self, sender: str | bytes, esmtp_args: str | bytes | None = None
    ) -> None:
        """Replace the envelope sender."""
        self._check_action(Actions.REPLACE_SENDER, "replace_sender")
        args = None if esmtp_args is None else _plain(esmtp_args, "ESMTP arguments")
        await self._host.queue(ChangeSender(_plain(sender, "sender"), args))

    async def append_body_chunk(self, data: str | bytes) -> None:
        """Append ``data`` to the replacement body (calls build it up in order).

        Sent in packets of at most 65535 bytes.
        """
        self._check_action(Actions.REPLACE_BODY, "append_body_chunk")
        body = _to_bytes(data, "body chunk")
        for start in range(0, len(body), CHUNK_SIZE):
            await self._host.queue(ReplaceBody(body[start : start + CHUNK_SIZE]))

    async def quarantine(self, reason: str | bytes) -> None:
        """Put the message in the MTA's hold (quarantine) queue."""
        self._check_action(Actions.QUARANTINE, "quarantine")
        await self._host.queue(Quarantine(_plain(reason, "quarantine reason")))

    async def signal_progress(self) -> None:
        """Tell the MTA we are still working (resets its timeout); sent at once.

        Rarely needed: while an end-of-message handler runs longer than the
        server's progress interval, progress is sent automatically.
        """
        self._require_stage(Stage.EOM, "signal_progress")
        await self._host.queue(_PROGRESS, flush=True)


class Context(Generic[D, M]):
    """Passed first to every handler of one MTA connection.

    ``Context[D, M]``: ``D`` is the type of the per-connection data, ``M`` of
    the per-message data (``None`` when not given: ``Context[None]``,
    ``Context[Client]``).

    - ``data`` is yours: it survives across the messages of the connection
      and is dropped after ``on_close``. With ``Milter(connection_data=...)``
      it starts as a new object from that factory for every connection, and
      `connection_data` gives it without the ``None``.
    - `message_data` is a new object from ``Milter(message_data=...)`` for
      every message, made when a handler of the message first asks for it
      and dropped when the message ends (end of message, a decision, abort);
      if it is a context manager, its ``__exit__`` runs then.
    - ``api`` talks to the MTA.
    """

    __slots__ = ("_host", "_message", "_message_factory", "api", "data")

    def __init__(self, host: ContextHost, message_factory: Callable[[], M] | None = None) -> None:
        self.data: D | None = None
        self.api = ContextApi(host)
        self._host = host
        self._message: M | None = None
        self._message_factory = message_factory

    @property
    def connection_data(self) -> D:
        """The per-connection data (``data``), never None.

        Raises `LookupError` when there is none: the milter has no
        ``connection_data`` factory and no handler set ``data``.
        """
        data = self.data
        if data is None:
            raise LookupError(
                "no connection data: give Milter(connection_data=...) a factory, or set ctx.data"
            )
        return data

    @property
    def message_data(self) -> M:
        """The data of the current message, made by ``Milter(message_data=...)`` on first use.

        Raises `LookupError` when the milter has no ``message_data`` factory,
        `StageError` outside a message (``on_connect``, ``on_helo``,
        ``on_close``; ``on_abort`` still sees the aborted message's data).
        """
        message = self._message
        if message is None:
            factory = self._message_factory
            if factory is None:
                raise LookupError("no message data: give Milter(message_data=...) a factory")
            host = self._host
            if not host.in_message and host.stage is not Stage.ABORT:
                raise StageError(f"message_data is per message; on_{host.stage.value} is in none")
            message = self._message = factory()
        return message

    def _end_message(self) -> None:
        """Drop the message's data (the dispatcher calls it when a message ends)."""
        self._message = None

    @property
    def connection_nursery(self) -> ConnectionTasks:
        """Start background work tied to this MTA connection (nursery-style).

        Start a lookup at connect and await its result at end of message;
        whatever is still running when the connection ends is cancelled. An
        exception escaping a task is a panic, as if a handler had raised it.
        """
        tasks = self._host.tasks
        if tasks is None:
            raise StageError("background tasks are not available outside a connection")
        return tasks

    @property
    def connection_id(self) -> str:
        """The id that every log line about this connection carries."""
        return self._host.connection_id

    @property
    def stage(self) -> Stage:
        """The stage whose handler is running."""
        return self._host.stage

    @property
    def negotiated_actions(self) -> Actions:
        """The actions the MTA granted (what ``on_eom`` may do)."""
        return self._host.actions


__all__ = [
    "Context",
    "ContextApi",
    "ContextHost",
    "SocketFamily",
    "SocketInfo",
    "Stage",
    "build_error_reply",
]
