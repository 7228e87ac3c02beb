"""FrameReader: packets cut out of a byte stream in any split (protocol.md §1)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from triomilter.protocol import (
    MAX_DATA_SIZE,
    FrameReader,
    MilterConnection,
    MtaConnection,
    RemoteProtocolError,
)

from ._helpers import POSTFIX_OFFER, SETTINGS, chunks, frame, milter, mta

FRAMES: list[tuple[int, bytes]] = [
    (ord("O"), bytes.fromhex("00000006 000001FF 001FFFFF")),
    (ord("D"), b"C"),
    (ord("D"), b"Cj\0mx.example\0{daemon_name}\0mx\0"),
    (ord("C"), b"mx.example\x004\xc0\x00192.0.2.1\0"),
    (ord("T"), b""),
    (ord("B"), b"\0\0\0\x05 NULs and a length-looking prefix\r\n" * 50),
    (ord("E"), b""),
    (ord("Q"), b""),
]
STREAM = b"".join(frame(code, data) for code, data in FRAMES)


def drain(reader: FrameReader) -> list[tuple[int, bytes]]:
    out = []
    while (item := reader.next_frame()) is not None:
        out.append(item)
    return out


def read_in_pieces(
    pieces: list[bytes], max_data_size: int = MAX_DATA_SIZE
) -> list[tuple[int, bytes]]:
    reader = FrameReader(max_data_size)
    out = []
    for piece in pieces:
        reader.feed(piece)
        out += drain(reader)
    assert reader.buffered == 0
    return out


def test_many_packets_in_one_buffer() -> None:
    reader = FrameReader()
    reader.feed(STREAM)
    assert reader.buffered == len(STREAM)
    assert drain(reader) == FRAMES
    assert reader.buffered == 0
    assert reader.next_frame() is None


def test_one_byte_at_a_time() -> None:
    reader = FrameReader()
    out = []
    for i in range(len(STREAM)):
        reader.feed(STREAM[i : i + 1])
        got = drain(reader)
        # A frame completes exactly at its last byte, never earlier.
        if got:
            assert len(got) == 1
        out += got
    assert out == FRAMES


@SETTINGS
@given(cuts=st.lists(st.integers(0, len(STREAM)), max_size=40))
def test_random_splits_give_identical_frames(cuts: list[int]) -> None:
    assert read_in_pieces(chunks(STREAM, cuts)) == FRAMES


@SETTINGS
@given(
    frames=st.lists(
        st.tuples(st.integers(0, 255), st.binary(max_size=300)), min_size=1, max_size=20
    ),
    data=st.data(),
)
def test_arbitrary_frames_in_arbitrary_splits(
    frames: list[tuple[int, bytes]], data: st.DataObject
) -> None:
    stream = b"".join(frame(code, payload) for code, payload in frames)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=30))
    assert read_in_pieces(chunks(stream, cuts)) == frames


def test_empty_feeds_are_harmless() -> None:
    reader = FrameReader()
    reader.feed(b"")
    assert reader.next_frame() is None
    reader.feed(frame("c")[:2])
    reader.feed(b"")
    assert reader.next_frame() is None
    assert reader.buffered == 2
    reader.feed(frame("c")[2:])
    assert reader.next_frame() == (ord("c"), b"")


def test_partial_header_and_partial_payload_wait() -> None:
    reader = FrameReader()
    wire = frame("H", b"client.example\0")
    for end in range(len(wire)):
        reader = FrameReader()
        reader.feed(wire[:end])
        assert reader.next_frame() is None
        assert reader.buffered == end


def test_consumed_bytes_are_released_across_feeds() -> None:
    reader = FrameReader()
    wire = frame("B", b"x" * 1000)
    for _ in range(100):
        reader.feed(wire + wire[:3])
        assert reader.next_frame() == (ord("B"), b"x" * 1000)
        reader.feed(wire[3:])
        # The internal buffer holds one partial frame plus the new data, not
        # everything ever received.
        assert len(reader._buf) <= len(wire) + 3
        assert reader.next_frame() == (ord("B"), b"x" * 1000)
        assert reader.buffered == 0


# --- limits ----------------------------------------------------------------------


def header(length: int) -> bytes:
    return struct.pack(">I", length)


def test_default_limit_is_65535_data_bytes() -> None:
    reader = FrameReader()
    assert reader.max_data_size == MAX_DATA_SIZE == 65535
    # Exactly the limit: accepted, waits for the payload.
    reader.feed(header(65536) + b"B")
    assert reader.next_frame() is None
    reader.feed(b"\0" * 65535)
    assert reader.next_frame() == (ord("B"), b"\0" * 65535)


@pytest.mark.parametrize("length", [65537, 0x7FFFFFFF, 0xFFFFFFFF])
def test_oversized_length_refused_as_soon_as_the_header_arrives(length: int) -> None:
    reader = FrameReader()
    reader.feed(header(length))
    # Only the 4-byte header is in: refused before any payload is waited for.
    assert reader.buffered == 4
    with pytest.raises(RemoteProtocolError, match=f"{length - 1} data bytes exceeds the limit"):
        reader.next_frame()


def test_oversized_length_refused_after_earlier_frames() -> None:
    reader = FrameReader()
    reader.feed(frame("c") + header(70000)[:2])
    assert reader.next_frame() == (ord("c"), b"")
    assert reader.next_frame() is None  # half a header: nothing known yet
    reader.feed(header(70000)[2:])
    with pytest.raises(RemoteProtocolError, match="69999 data bytes exceeds the limit of 65535"):
        reader.next_frame()


@pytest.mark.parametrize("limit", [0, 1, 10, 262143, 1048575])
def test_limit_is_configurable(limit: int) -> None:
    reader = FrameReader(limit)
    assert reader.max_data_size == limit
    reader.feed(frame("B", b"x" * limit))
    assert reader.next_frame() == (ord("B"), b"x" * limit)
    reader.feed(header(limit + 2))
    with pytest.raises(RemoteProtocolError, match=f"exceeds the limit of {limit}"):
        reader.next_frame()


def test_limit_can_be_changed_on_a_live_reader() -> None:
    reader = FrameReader()
    reader.max_data_size = 1048575
    reader.feed(header(100001) + b"B")
    assert reader.next_frame() is None
    reader.feed(b"y" * 100000)
    assert reader.next_frame() == (ord("B"), b"y" * 100000)


def test_zero_length_rejected() -> None:
    reader = FrameReader()
    reader.feed(header(0))
    with pytest.raises(RemoteProtocolError, match="length 0"):
        reader.next_frame()


def test_zero_length_rejected_after_a_good_frame() -> None:
    reader = FrameReader()
    reader.feed(frame("A") + header(0) + b"junk")
    assert reader.next_frame() == (ord("A"), b"")
    with pytest.raises(RemoteProtocolError, match="length 0"):
        reader.next_frame()


# --- the limit in both roles -------------------------------------------------------


def test_milter_connection_enforces_its_limit_on_the_header() -> None:
    conn = milter(max_data_size=100)
    assert conn.max_data_size == 100
    conn.receive_data(frame("B", b"x" * 100)[:4])  # header only, 100 data bytes: fine
    assert conn.buffered == 4
    conn = milter(max_data_size=100)
    conn.receive_data(header(102))
    with pytest.raises(RemoteProtocolError, match="101 data bytes exceeds the limit of 100"):
        conn.next_event()


def test_milter_connection_default_limit() -> None:
    conn = MilterConnection()
    assert conn.max_data_size == 65535
    conn.receive_data(header(65537))
    with pytest.raises(RemoteProtocolError, match="exceeds the limit"):
        conn.next_event()


def test_mta_connection_enforces_its_limit_on_replies() -> None:
    conn = MtaConnection(max_data_size=10)
    conn.send(POSTFIX_OFFER)
    conn.receive_data(header(13))  # an O reply (12 data bytes) is over this tiny limit
    with pytest.raises(RemoteProtocolError, match="12 data bytes exceeds the limit of 10"):
        conn.next_event()
    conn = mta()
    conn.receive_data(header(0))
    with pytest.raises(RemoteProtocolError, match="length 0"):
        conn.next_event()
