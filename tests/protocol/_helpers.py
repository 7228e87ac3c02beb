"""Shared helpers for the protocol engine tests.

Frames are built here by hand (`frame`), independently of the engine's own
encoder, so the tests check real bytes rather than the engine against itself.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from hypothesis import HealthCheck, settings

from triomilter.protocol import (
    ALL_ACTIONS,
    ALL_PROTOCOL_OPTS,
    CONTINUE,
    Actions,
    AddressFamily,
    Command,
    Connect,
    MilterConnection,
    MtaConnection,
    NeedData,
    OptionNegotiation,
    OptionNegotiationReply,
    ProtocolOpts,
    Reply,
    negotiate,
)

SETTINGS = settings(deadline=None, max_examples=100)
"""Hypothesis settings of this suite: no deadline (no timing flakiness)."""

FUZZ_SETTINGS = settings(
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

ALL_ACTIONS = ALL_ACTIONS
ALL_OPTS = ALL_PROTOCOL_OPTS
POSTFIX_OFFER = OptionNegotiation(6, ALL_ACTIONS, ALL_OPTS)
POSTFIX_OFFER_BYTES = bytes.fromhex("0000000D 4F 00000006 000001FF 001FFFFF")


def frame(code: str | int, data: bytes = b"") -> bytes:
    """One packet by hand: uint32 length (code + data), the code byte, the data."""
    code_byte = code.encode("ascii") if isinstance(code, str) else bytes((code,))
    return struct.pack(">I", len(data) + 1) + code_byte + data


def strings(*parts: bytes) -> bytes:
    """NUL-terminate and join ``parts``."""
    return b"".join(part + b"\0" for part in parts)


def macro_frame(stage: str, *pairs: tuple[bytes, bytes]) -> bytes:
    """A ``D`` packet for the command ``stage`` with ``name\\0value\\0`` pairs."""
    return frame("D", stage.encode("ascii") + b"".join(strings(n, v) for n, v in pairs))


def split_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Cut a byte string of whole packets into (code, data), by hand."""
    frames = []
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        frames.append((data[pos + 4], data[pos + 5 : pos + 4 + length]))
        pos += 4 + length
    assert pos == len(data)
    return frames


def events(
    conn: MilterConnection, data: bytes = b"", reply: Reply | None = CONTINUE
) -> list[Command]:
    """Feed ``data`` and take every event, answering each owed reply with ``reply``.

    With ``reply=None`` it stops at the first event that owes a reply.
    """
    conn.receive_data(data)
    out: list[Command] = []
    while True:
        event = conn.next_event()
        if isinstance(event, NeedData):
            return out
        out.append(event)
        if conn.owed is not None:
            if reply is None:
                return out
            conn.send(reply)


def one_event(conn: MilterConnection, data: bytes = b"") -> Command:
    """Feed ``data`` and take exactly the next event (which must be there)."""
    conn.receive_data(data)
    event = conn.next_event()
    assert not isinstance(event, NeedData), "expected an event, got NEED_DATA"
    return event


def milter(
    actions: Actions = Actions.NONE,
    opts: ProtocolOpts = ProtocolOpts.NONE,
    *,
    offer: OptionNegotiation = POSTFIX_OFFER,
    connect: bool = True,
    max_data_size: int | None = None,
) -> MilterConnection:
    """A milter connection negotiated with ``offer`` (and connected unless told not to)."""
    conn = MilterConnection() if max_data_size is None else MilterConnection(max_data_size)
    offer_event = one_event(conn, offer.encode())
    assert isinstance(offer_event, OptionNegotiation)
    conn.accept_negotiation(negotiate(offer_event, actions, opts))
    if connect and not opts & ProtocolOpts.NO_CONNECT:
        events(conn, frame("C", b"client.example\0U"))
    return conn


def mta(
    actions: Actions = Actions.NONE,
    opts: ProtocolOpts = ProtocolOpts.NONE,
    *,
    offer: OptionNegotiation = POSTFIX_OFFER,
    connect: bool = True,
) -> MtaConnection:
    """An MTA connection whose offer the milter answered (and connected unless told not to)."""
    conn = MtaConnection()
    conn.send(offer)
    conn.receive_data(OptionNegotiationReply(min(6, offer.version), actions, opts).encode())
    conn.next_event()
    if connect and not opts & ProtocolOpts.NO_CONNECT:
        conn.send(Connect(b"client.example", AddressFamily.UNKNOWN))
        if conn.awaiting is not None:
            conn.receive_data(frame("c"))
            conn.next_event()
    return conn


def feed_replies(conn: MtaConnection, data: bytes) -> list[Reply]:
    """Feed reply bytes to an MTA connection and take every reply."""
    conn.receive_data(data)
    out: list[Reply] = []
    while True:
        reply = conn.next_event()
        if isinstance(reply, NeedData):
            return out
        out.append(reply)


def chunks(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """Cut ``data`` at the given offsets (any order, duplicates and out-of-range ignored)."""
    points = sorted({c for c in cuts if 0 < c < len(data)})
    out = []
    start = 0
    for point in [*points, len(data)]:
        out.append(data[start:point])
        start = point
    return out
