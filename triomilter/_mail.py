"""Reading RFC 5322 messages for `triomilter check`: files, directories, mbox, stdin.

Two layers. `LineSplitter` and `MessageParser` are sans-IO: bytes in,
events out (`MessageStart`, `Field`, `HeadersEnd`, `BodyPiece`,
`MessageEnd`). `MessageSource` reads the inputs in blocks (in a thread, so
the event loop never blocks on a slow stdin) and hands out one `Message` at a
time: its header fields at once, its body piece by piece, so a message of
any size is streamed like an MTA streams it, never held in memory whole.

What the MTA does to a message before a milter sees it (protocol.md §5.3):
lines end in CRLF on the wire whatever the file used; a header field's value
reaches the milter without the colon and the line ends, folded lines joined
by a bare LF. The parser keeps both forms of everything: ``raw`` as in the
input (to write the delivered message and diff it against the input) and
``wire`` as an MTA sends it.

mbox (a file whose first line starts with ``From ``): each ``From `` line
starts a message and gives its envelope sender; ``>From`` lines are
unquoted (mboxrd) and the empty line before the next ``From `` line is the
separator, not part of the message.
"""

from __future__ import annotations

import os
import re
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from email.utils import getaddresses
from typing import BinaryIO, Protocol

import attrs
import trio

BLOCK_SIZE = 256 * 1024
"""How much of an input is read at a time."""
MAX_LINE = 64 * 1024
"""A longer line is passed on in pieces (bounded memory for files without line ends)."""
MAX_HEADER_BYTES = 16 * 1024 * 1024
"""A header section larger than this is an error (it is held in memory)."""


class MessageError(ValueError):
    """An input cannot be read as messages (the reason is in the message)."""


# --- events ---------------------------------------------------------------------------


@attrs.frozen
class HeaderField:
    """One header field.

    ``raw`` is the field as in the input (every line with its line end);
    ``value`` is what an MTA sends to a milter: the text after the colon,
    line ends removed, folded lines joined by ``\\n`` (the one leading
    space is still there: the MTA strips it unless HEADER_LEADING_SPACE).
    """

    name: bytes
    value: bytes
    raw: bytes


@attrs.frozen
class MessageStart:
    """A message begins; ``sender`` is the address of its mbox ``From `` line, if any."""

    sender: bytes | None = None


@attrs.frozen
class Field:
    field: HeaderField


@attrs.frozen
class HeadersEnd:
    """The header section ended; ``separator`` is the empty line (``b""`` if none)."""

    separator: bytes


@attrs.frozen
class BodyPiece:
    """Body bytes: ``raw`` as in the input, ``wire`` with CRLF line ends."""

    raw: bytes
    wire: bytes


@attrs.frozen
class MessageEnd:
    pass


Event = MessageStart | Field | HeadersEnd | BodyPiece | MessageEnd


# --- sans-IO parsing ------------------------------------------------------------------


class LineSplitter:
    """Cuts a byte stream into lines, each with its line end (``\\n`` or ``\\r\\n``).

    A line longer than `MAX_LINE` comes out in pieces; only the last piece
    has the line end. The last line of the stream may have none.
    """

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> list[bytes]:
        parts = (self._pending + data).split(b"\n")
        rest = parts.pop()
        lines: list[bytes] = []
        for part in parts:
            lines += _cut(part + b"\n")
        pieces = _cut(rest)
        self._pending = pieces.pop() if pieces else b""
        return lines + pieces

    def end(self) -> list[bytes]:
        rest, self._pending = self._pending, b""
        return [rest] if rest else []


def _cut(line: bytes) -> list[bytes]:
    """``line`` in pieces of at most `MAX_LINE` bytes (never between CR and LF)."""
    pieces = []
    while len(line) > MAX_LINE:
        cut = MAX_LINE - 1 if line[MAX_LINE - 1 : MAX_LINE + 1] == b"\r\n" else MAX_LINE
        pieces.append(line[:cut])
        line = line[cut:]
    if line:
        pieces.append(line)
    return pieces


_FIELD_NAME = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")


def _wire(line: bytes) -> bytes:
    """The line as an MTA sends it: CRLF at the end (also added to a last unended line)."""
    if line.endswith(b"\r\n"):
        return line
    if line.endswith(b"\n"):
        return line[:-1] + b"\r\n"
    return line


def _is_blank(line: bytes) -> bool:
    return line in (b"\n", b"\r\n")


class MessageParser:
    """Lines of one input in, message events out.

    ``mbox`` is decided by the first line (``From ...``) unless given.
    """

    __slots__ = ("_continued", "_field", "_header_bytes", "_held", "_mbox", "_state")

    def __init__(self) -> None:
        self._mbox: bool | None = None
        self._state = "start"  # start, headers, body
        self._field: list[bytes] = []
        self._header_bytes = 0
        self._held: bytes | None = None  # mbox: an empty line that may be a separator
        self._continued = False  # the previous piece had no line end: this one goes on

    @property
    def mbox(self) -> bool:
        """Whether the input is an mbox (known from its first line on)."""
        return bool(self._mbox)

    def line(self, line: bytes) -> list[Event]:
        continued, self._continued = self._continued, not line.endswith(b"\n")
        events: list[Event] = []
        if self._mbox is None:
            self._mbox = line.startswith(b"From ")
        if self._mbox and not continued:
            if line.startswith(b"From "):
                if self._state != "start":
                    self._held = None  # the separator before this From line
                    events += self._finish()
                self._state = "headers"
                events.append(MessageStart(_from_line_sender(line)))
                return events
            if re.match(rb">+From ", line):
                line = line[1:]
        if self._state == "start":
            self._state = "headers"
            events.append(MessageStart())
        if self._state == "headers":
            events += self._header_line(line, continued)
        else:
            events += self._body_line(line, continued)
        return events

    def end(self) -> list[Event]:
        """The input ended (an empty input is one empty message)."""
        if self._state == "start":
            return [MessageStart(), HeadersEnd(b""), MessageEnd()]
        self._held = None  # mbox: the last message's separator
        return self._finish()

    def _header_line(self, line: bytes, continued: bool) -> list[Event]:
        self._header_bytes += len(line)
        if self._header_bytes > MAX_HEADER_BYTES:
            raise MessageError(f"the header section is larger than {MAX_HEADER_BYTES} bytes")
        if continued or (line[:1] in (b" ", b"\t") and self._field):
            self._field.append(line)
            return []
        events = self._flush_field()
        if _is_blank(line):
            self._state = "body"
            events.append(HeadersEnd(line))
        elif _FIELD_NAME.match(line):
            self._field = [line]
        else:
            # Not a header field: the body starts here, without an empty line
            # (MTAs do the same; the line is the body's first).
            self._state = "body"
            events.append(HeadersEnd(b""))
            events += self._body_line(line, False)
        return events

    def _flush_field(self) -> list[Event]:
        if not self._field:
            return []
        lines, self._field = self._field, []
        raw = b"".join(lines)
        match = _FIELD_NAME.match(raw)
        assert match is not None
        value = raw[match.end() :]
        # Folded lines are joined by a bare LF: drop each line's CR LF, keep the fold.
        value = value.replace(b"\r\n", b"\n")
        value = value.removesuffix(b"\n")
        return [Field(HeaderField(match.group(1), value, raw))]

    def _body_line(self, line: bytes, continued: bool) -> list[Event]:
        events: list[Event] = []
        if self._held is not None:
            held, self._held = self._held, None
            events.append(BodyPiece(held, _wire(held)))
        if self._mbox and not continued and _is_blank(line):
            self._held = line
            return events
        events.append(BodyPiece(line, _wire(line)))
        return events

    def _finish(self) -> list[Event]:
        events: list[Event] = []
        if self._state == "headers":
            events += self._flush_field()
            events.append(HeadersEnd(b""))
        elif self._held is not None:
            events.append(BodyPiece(self._held, _wire(self._held)))
        self._held = None
        self._header_bytes = 0
        self._continued = False
        events.append(MessageEnd())
        return events


def _from_line_sender(line: bytes) -> bytes | None:
    words = line.split()
    return words[1] if len(words) > 1 else None


# --- reading inputs -------------------------------------------------------------------


@attrs.define
class Message:
    """One message of an input: the header section read, the body still to come.

    Read the body with `MessageSource.body_piece` until it returns None
    (`MessageSource.next_message` skips what is left).
    """

    name: str
    """Where it comes from: the path (``-`` for stdin), ``#N`` added inside an mbox."""
    fields: list[HeaderField]
    separator: bytes
    mbox_sender: bytes | None
    newline: bytes
    """The line end of the input (``\\r\\n`` or ``\\n``): the delivered message keeps it."""


class _Reader(Protocol):
    async def read(self, size: int = -1, /) -> bytes: ...


class MessageSource:
    """The messages of every input, in order, one at a time.

    An input is a file (one message, or an mbox), a directory (its files,
    sorted by path, recursively, hidden ones left out), or ``-`` (standard
    input, read once).
    """

    def __init__(self, inputs: Sequence[str], stdin: BinaryIO | None = None) -> None:
        self._paths = iter(list(_expand(inputs)))  # missing inputs fail here, first
        self._stdin = stdin
        self._file: trio.abc.AsyncResource | None = None
        self._read: _Reader | None = None
        self._name = ""
        self._number = 0
        self._splitter = LineSplitter()
        self._parser = MessageParser()
        self._events: deque[Event] = deque()
        self._eof = True
        self._in_body = False

    async def aclose(self) -> None:
        await self._close_input()

    async def next_message(self) -> Message | None:
        """The next message with its header section, or None after the last one."""
        while self._in_body:
            await self.body_piece()
        while True:
            event = await self._next_event()
            if event is None:
                if not await self._open_next():
                    return None
                continue
            if isinstance(event, MessageStart):
                return await self._read_headers(event)

    async def body_piece(self) -> BodyPiece | None:
        """The next piece of the current message's body, or None at its end."""
        if not self._in_body:
            return None
        event = await self._next_event()
        if isinstance(event, BodyPiece):
            return event
        self._in_body = False  # MessageEnd (or the input ended)
        return None

    async def _read_headers(self, start: MessageStart) -> Message:
        self._number += 1
        fields: list[HeaderField] = []
        while True:
            event = await self._next_event()
            if isinstance(event, Field):
                fields.append(event.field)
            elif isinstance(event, HeadersEnd):
                break
            else:  # pragma: no cover - the parser always ends the headers first
                raise MessageError(f"{self._name}: unexpected {event!r} in the headers")
        name = f"{self._name}#{self._number}" if self._parser.mbox else self._name
        first = fields[0].raw if fields else event.separator
        end = first.find(b"\n")
        newline = b"\r\n" if end < 0 or first[end - 1 : end] == b"\r" else b"\n"
        self._in_body = True
        return Message(name, fields, event.separator, start.sender, newline)

    async def _next_event(self) -> Event | None:
        while not self._events:
            if self._read is None:
                return None
            block = await self._read.read(BLOCK_SIZE)
            if block:
                for line in self._splitter.feed(block):
                    self._events += self._parser.line(line)
            else:
                for line in self._splitter.end():
                    self._events += self._parser.line(line)
                self._events += self._parser.end()
                await self._close_input()
                if not self._events:
                    return None
        return self._events.popleft()

    async def _open_next(self) -> bool:
        await self._close_input()
        path = next(self._paths, None)
        if path is None:
            return False
        self._name = path
        self._number = 0
        self._splitter = LineSplitter()
        self._parser = MessageParser()
        if path == "-":
            stdin = self._stdin if self._stdin is not None else sys.stdin.buffer
            self._read = trio.wrap_file(stdin)
            self._file = None
        else:
            try:
                handle = await trio.open_file(path, "rb")
            except OSError as exc:
                raise MessageError(f"cannot read {path}: {exc.strerror or exc}") from None
            self._read = handle
            self._file = handle
        return True

    async def _close_input(self) -> None:
        if self._file is not None:
            await self._file.aclose()
        self._file = None
        self._read = None


def _expand(inputs: Sequence[str]) -> Iterator[str]:
    for name in inputs:
        if name != "-" and os.path.isdir(name):
            found = sorted(_walk(name))
            if not found:
                raise MessageError(f"{name}: no files in this directory")
            yield from found
        elif name != "-" and not os.path.exists(name):
            raise MessageError(f"no such file: {name}")
        else:
            yield name


def _walk(directory: str) -> Iterator[str]:
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "tmp"]  # Maildir's tmp/
        for file in files:
            if not file.startswith("."):
                yield os.path.join(root, file)


# --- the envelope from the headers ----------------------------------------------------


def header_values(fields: Sequence[HeaderField], name: bytes) -> list[bytes]:
    """The values (unfolded, leading space removed) of every field called ``name``."""
    lower = name.lower()
    return [f.value.replace(b"\n", b"").strip() for f in fields if f.name.lower() == lower]


def addresses(values: Sequence[bytes]) -> list[bytes]:
    """The addresses in address header values (``"A" <a@b>, c@d`` -> ``a@b``, ``c@d``)."""
    texts = [value.decode("utf-8", "surrogateescape") for value in values]
    found = [address for _, address in getaddresses(texts) if "@" in address]
    return [address.encode("utf-8", "surrogateescape") for address in dict.fromkeys(found)]


@attrs.frozen
class Client:
    """The SMTP client of a Received: header: its HELO name, host name and address."""

    helo: str
    name: str
    address: str


_RECEIVED_FROM = re.compile(r"^\s*from\s+(?P<helo>\S+)(?:\s*\((?P<info>[^)]*)\))?", re.I)
_BRACKETED = re.compile(r"(?:(?P<name>[^\s\[\]()]+)\s+)?\[(?:IPv6:)?(?P<address>[0-9A-Fa-f.:]+)\]")
_HELO_WORD = re.compile(r"\bhelo=(?P<helo>[^\s)]+)", re.I)
_LOOPBACK = ("127.", "::1")


def client_of(fields: Sequence[HeaderField]) -> Client | None:
    """The client of the first Received: header naming a client address that is not loopback.

    Understands the forms of Postfix and Sendmail (``from HELO (NAME
    [ADDR])``, ``(unknown [ADDR])``) and Exim (``from NAME ([ADDR]
    helo=HELO)``, ``from [ADDR] (helo=HELO)``). A client without a verified
    name is named ``[ADDR]``, as MTAs name it to milters.
    """
    for value in header_values(fields, b"Received"):
        client = _received_client(value.decode("utf-8", "replace"))
        if client is not None and not client.address.startswith(_LOOPBACK):
            return client
    return None


def _received_client(text: str) -> Client | None:
    match = _RECEIVED_FROM.match(text)
    if match is None:
        return None
    helo, info = match["helo"], match["info"] or ""
    name: str | None = None
    found = _BRACKETED.search(info)
    if found is not None:
        name = found["name"]
    else:
        found = _BRACKETED.fullmatch(helo)  # Exim: from [ADDR] (helo=NAME)
        if found is None:
            return None
    address = found["address"]
    word = _HELO_WORD.search(info)
    if word is not None:
        helo = word["helo"]
    if name is None or name.lower() == "unknown":
        name = f"[{address}]"
    return Client(helo, name, address)
