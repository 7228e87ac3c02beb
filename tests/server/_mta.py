"""A raw MTA-side client over real sockets, on the engine's `MtaConnection`.

Independent of ``triomilter.testing`` (written in parallel): it sends exactly
the bytes the engine encodes, reads replies with plain ``receive_some`` and
records every chunk received for the last command (``chunks``), so tests can
see how the milter's replies were written.
"""

from __future__ import annotations

import socket as stdsocket
import struct

import trio

from triomilter.protocol import (
    ABORT,
    ALL_ACTIONS,
    ALL_PROTOCOL_OPTS,
    DATA,
    END_OF_HEADERS,
    NEED_DATA,
    QUIT,
    AddressFamily,
    Body,
    Command,
    CommandCode,
    Connect,
    DefineMacros,
    EndOfMessage,
    Header,
    Helo,
    Mail,
    MtaConnection,
    OptionNegotiation,
    OptionNegotiationReply,
    Rcpt,
    Reply,
)

POSTFIX_OFFER = OptionNegotiation(6, ALL_ACTIONS, ALL_PROTOCOL_OPTS)
"""What Postfix offers (protocol.md §4.1): every action and every protocol step."""


def frame(code: str | int, data: bytes = b"") -> bytes:
    """One packet by hand: uint32 length (code + data), the code byte, the data."""
    code_byte = code.encode("ascii") if isinstance(code, str) else bytes((code,))
    return struct.pack(">I", len(data) + 1) + code_byte + data


class MilterClosed(Exception):
    """The milter closed the connection (EOF or reset) while a reply was awaited."""


class RawMta:
    """One MTA connection to a milter over a real socket."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.mta = MtaConnection()
        self.chunks: list[bytes] = []
        """The raw chunks received while reading the replies to the last command."""

    @classmethod
    async def tcp(cls, host: str, port: int) -> RawMta:
        return cls(await trio.open_tcp_stream(host, port))

    @classmethod
    async def unix(cls, path: str) -> RawMta:
        return cls(await trio.open_unix_socket(path))

    @classmethod
    async def to(cls, address: object) -> RawMta:
        """Connect to an address as reported by ``nursery.start(serve, ...)``."""
        if isinstance(address, str):
            return await cls.unix(address)
        assert isinstance(address, tuple)
        return await cls.tcp(address[0], address[1])

    # --- raw I/O ------------------------------------------------------------------

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def read_until_closed(self) -> bytes:
        """Read until the milter closes the connection; return what arrived."""
        received = bytearray()
        while True:
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:  # reset: the milter closed with unread data
                return bytes(received)
            if not data:
                return bytes(received)
            received += data

    async def aclose(self) -> None:
        await self.stream.aclose()

    def tcp_info_data_segs_in(self) -> int:
        """``tcpi_data_segs_in`` of this (client) socket: TCP segments with data received."""
        info = self.stream.socket.getsockopt(stdsocket.IPPROTO_TCP, stdsocket.TCP_INFO, 256)
        if len(info) < 156:
            raise OSError("TCP_INFO without tcpi_data_segs_in")
        return int(struct.unpack_from("=I", info, 152)[0])

    # --- commands -----------------------------------------------------------------

    async def command(self, command: Command) -> list[Reply] | None:
        """Send ``command`` (unless the milter disabled it) and read its replies.

        Returns every reply (modifications, then the final one); ``[]`` for a
        command that gets none; None if the milter negotiated not to get it.
        """
        if command.code != CommandCode.MACRO and self.mta.is_disabled(command.code):
            return None
        await self.stream.send_all(self.mta.send(command))
        if self.mta.awaiting is None:
            return []
        return await self.replies()

    async def replies(self) -> list[Reply]:
        """Read until the final reply to the awaited command."""
        replies: list[Reply] = []
        self.chunks = []
        while True:
            event = self.mta.next_event()
            if event is NEED_DATA:
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError as exc:
                    raise MilterClosed(f"connection reset: {exc}") from exc
                if not data:
                    raise MilterClosed("the milter closed the connection")
                self.chunks.append(data)
                self.mta.receive_data(data)
                continue
            replies.append(event)  # type: ignore[arg-type]
            if self.mta.awaiting is None:
                return replies

    async def final(self, command: Command) -> Reply | None:
        """The final reply to ``command`` (None if it gets none)."""
        replies = await self.command(command)
        return replies[-1] if replies else None

    async def negotiate(self, offer: OptionNegotiation = POSTFIX_OFFER) -> OptionNegotiationReply:
        reply = await self.final(offer)
        assert isinstance(reply, OptionNegotiationReply), reply
        return reply

    async def macros(self, stage: str, **pairs: str) -> None:
        items = tuple((k.encode(), v.encode()) for k, v in pairs.items())
        await self.command(DefineMacros(ord(stage), items))

    async def connect(
        self, hostname: str = "mx.example", address: str = "192.0.2.1", port: int = 49152
    ) -> Reply | None:
        return await self.final(
            Connect(hostname.encode(), AddressFamily.INET, port, address.encode())
        )

    async def helo(self, name: str = "client.example") -> Reply | None:
        return await self.final(Helo(name.encode()))

    async def mail(self, sender: str = "<a@example.org>", *args: str) -> Reply | None:
        return await self.final(Mail((sender.encode(), *(a.encode() for a in args))))

    async def rcpt(self, rcpt: str = "<b@example.net>", *args: str) -> Reply | None:
        return await self.final(Rcpt((rcpt.encode(), *(a.encode() for a in args))))

    async def data(self) -> Reply | None:
        return await self.final(DATA)

    async def header(self, name: str, value: str) -> Reply | None:
        return await self.final(Header(name.encode(), value.encode()))

    async def eoh(self) -> Reply | None:
        return await self.final(END_OF_HEADERS)

    async def body(self, chunk: bytes) -> Reply | None:
        return await self.final(Body(chunk))

    async def eom(self) -> list[Reply]:
        replies = await self.command(EndOfMessage())
        assert replies is not None
        return replies

    async def abort(self) -> None:
        await self.command(ABORT)

    async def quit(self) -> None:
        await self.command(QUIT)

    async def message(self, queue_id: str = "4ABC123") -> list[Reply]:
        """One message from MAIL to end of message (every step the milter wants)."""
        await self.macros("M", i=queue_id)
        await self.mail()
        await self.rcpt()
        await self.data()
        await self.header("Subject", "hello")
        await self.header("From", "a@example.org")
        await self.eoh()
        await self.body(b"Hello world.\r\n")
        return await self.eom()

    async def transaction(self, queue_id: str = "4ABC123") -> list[Reply]:
        """Negotiate, connect, HELO, one message, QUIT; return the end-of-message replies."""
        await self.negotiate()
        await self.connect()
        await self.helo()
        replies = await self.message(queue_id)
        await self.quit()
        return replies
