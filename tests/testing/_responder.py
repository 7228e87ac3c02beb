"""A scripted milter written directly on the engine's milter role, for testing the client.

`Responder` negotiates with a fixed ``O`` reply and answers each command
with what its ``script`` returns: engine replies (validated by the engine,
so the responder itself stays honest) or raw bytes (to break the protocol
on purpose). It records every command and the macros in force for it.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
import trio.testing

from triomilter.protocol import (
    ALL_ACTIONS,
    CONTINUE,
    NEED_DATA,
    Actions,
    Command,
    MilterConnection,
    NeedData,
    OptionNegotiation,
    OptionNegotiationReply,
    ProtocolOpts,
    Reply,
)
from triomilter.testing import MilterClient, open_stream


class Marker(enum.Enum):
    HANG = "hang"
    """Stop answering (but keep the connection open)."""
    HANG_UP = "hang up"
    """Close the connection."""


HANG = Marker.HANG
HANG_UP = Marker.HANG_UP

Answer = Sequence[Reply | bytes | float | Marker]
"""Replies (through the engine), raw packets, pauses in seconds, or a `Marker`."""
Script = Callable[[Command, MilterConnection], Answer | None]
"""Returns what to send for a command; ``None`` means the default (CONTINUE if owed)."""

ALL_ACTIONS = ALL_ACTIONS


def raw(code: str, data: bytes = b"") -> bytes:
    """One packet by hand, bypassing the engine's checks."""
    return struct.pack(">I", len(data) + 1) + code.encode("ascii") + data


@attrs.define
class Seen:
    """A command as the milter received it, with the macros defined for it."""

    command: Command
    macros: dict[bytes, bytes]


@attrs.define
class Responder:
    actions: Actions = ALL_ACTIONS
    opts: ProtocolOpts = ProtocolOpts.NONE
    macros: tuple[Any, ...] = ()
    script: Script | None = None
    seen: list[Seen] = attrs.field(factory=list)
    offer: OptionNegotiation | None = None
    closed_after_quit: bool = True
    negotiation: bytes | None = None
    """Raw ``O`` reply to send instead of a valid one."""
    done: trio.Event = attrs.field(factory=trio.Event)

    @property
    def commands(self) -> list[Command]:
        return [seen.command for seen in self.seen]

    @property
    def codes(self) -> str:
        """The commands received, as their code letters ("CHMRTLNBE...")."""
        return "".join(chr(seen.command.code) for seen in self.seen)

    async def _answer(
        self, stream: trio.abc.Stream, conn: MilterConnection, answer: Answer
    ) -> bool:
        """Send ``answer``; True if the connection is to be closed."""
        out = bytearray()
        for item in answer:
            if isinstance(item, bytes):
                out += item
            elif isinstance(item, float | int):
                await stream.send_all(bytes(out))
                out.clear()
                await trio.sleep(item)
            elif item is HANG:
                await stream.send_all(bytes(out))
                await trio.sleep_forever()
            elif item is HANG_UP:
                await stream.send_all(bytes(out))
                return True
            elif not isinstance(item, Marker):
                out += conn.send(item)
        if out:
            await stream.send_all(bytes(out))
        return False

    async def serve(self, stream: trio.abc.Stream) -> None:
        conn = MilterConnection()
        try:
            while True:
                event = conn.next_event()
                if event is NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                    continue
                assert not isinstance(event, NeedData)
                if isinstance(event, OptionNegotiation):
                    self.offer = event
                    if self.negotiation is not None:
                        await stream.send_all(self.negotiation)
                        await _drain(stream)
                        return
                    version = min(6, event.version)
                    reply = OptionNegotiationReply(version, self.actions, self.opts, self.macros)
                    await stream.send_all(conn.send(reply))
                    continue
                self.seen.append(Seen(event, conn.macros.snapshot()))
                answer = self.script(event, conn) if self.script is not None else None
                if answer is None:
                    answer = [CONTINUE] if conn.owed is not None else []
                if await self._answer(stream, conn, answer):
                    return
                if conn.owed is not None:
                    # A raw packet stood in for the reply: the session is off the
                    # rails; read what comes until the client hangs up.
                    await _drain(stream)
                    return
                if event.code == ord("Q"):
                    if not self.closed_after_quit:
                        await trio.sleep_forever()
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            self.done.set()


async def _drain(stream: trio.abc.Stream) -> None:
    while await stream.receive_some(65536):
        pass


@asynccontextmanager
async def session(responder: Responder, **options: Any) -> AsyncIterator[MilterClient]:
    """A client over an in-memory stream with ``responder`` serving the other end."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    failure: BaseException | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(responder.serve, server_stream)
        try:
            async with open_stream(client_stream, settle=True, **options) as client:
                yield client
        except BaseException as exc:  # raised again below, not wrapped in a group
            failure = exc
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
