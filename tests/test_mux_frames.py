"""The mux frame codec: round trips in any split, and a decoder that only returns or refuses.

Pure: no sockets, no event loop. The fuzz tests run thousands of cases each.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tete_tunnel.mux.errors import ProtocolError
from tete_tunnel.mux.frames import (
    HEADER_SIZE,
    MAX_PAYLOAD,
    MAX_U32,
    VERSION,
    Flag,
    Frame,
    FrameDecoder,
    FrameType,
    encode,
    encode_header,
)

FUZZ = settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

all_flags = st.integers(0, 15).map(Flag)


@st.composite
def frames(draw: st.DrawFn, max_payload: int = 2048) -> Frame:
    type_ = draw(st.sampled_from(FrameType))
    flags = draw(all_flags)
    if type_ in (FrameType.PING, FrameType.GO_AWAY):
        stream_id = 0
    else:
        stream_id = draw(st.one_of(st.integers(1, 10), st.integers(1, MAX_U32)))
    if type_ is FrameType.DATA:
        payload = draw(st.binary(max_size=max_payload))
        return Frame(type_, flags, stream_id, len(payload), payload)
    length = draw(st.one_of(st.integers(0, 10), st.integers(0, MAX_U32)))
    return Frame(type_, flags, stream_id, length)


def normalized(frame: Frame) -> tuple[FrameType, Flag, int, int, bytes]:
    return (frame.type, frame.flags, frame.stream_id, frame.length, bytes(frame.payload))


def cuts_from(sizes: bytes, total: int) -> list[int]:
    """Split points for a `total`-byte wire: each byte of `sizes` is a chunk length - 1."""
    cuts, pos = [], 0
    for size in sizes:
        pos += size + 1
        if pos >= total:
            break
        cuts.append(pos)
    return cuts


def decode_in_pieces(wire: bytes, cuts: list[int]) -> list[Frame]:
    decoder = FrameDecoder()
    out: list[Frame] = []
    start = 0
    for cut in [*sorted(set(cuts)), len(wire)]:
        decoder.feed(wire[start:cut])
        out.extend(decoder.frames())
        start = cut
    assert decoder.buffered == 0
    assert decoder.next_frame() is None
    return out


def is_valid_header(header: bytes) -> bool:
    """An independent statement of what the decoder must accept."""
    version, type_, flags, stream_id, length = struct.unpack("!BBHII", header)
    if version != 0 or type_ > 3 or flags & ~0xF:
        return False
    if type_ in (2, 3):  # ping, go away: session frames
        return stream_id == 0
    if stream_id == 0:
        return False
    return type_ != 0 or length <= MAX_PAYLOAD


# -- round trips ----------------------------------------------------------------------


def test_header_layout_is_yamux() -> None:
    wire = encode_header(FrameType.WINDOW_UPDATE, Flag.SYN | Flag.ACK, 0x01020304, 0x0A0B0C0D)
    assert wire == bytes([0, 1, 0, 3, 1, 2, 3, 4, 0x0A, 0x0B, 0x0C, 0x0D])
    assert HEADER_SIZE == 12
    data = encode(Frame(FrameType.DATA, Flag.FIN, 7, 3, b"abc"))
    assert data == bytes([0, 0, 0, 4, 0, 0, 0, 7, 0, 0, 0, 3]) + b"abc"


@pytest.mark.parametrize("type_", list(FrameType))
@pytest.mark.parametrize("flags", range(16))
def test_every_type_and_flag_combination_round_trips(type_: FrameType, flags: int) -> None:
    stream_id = 0 if type_ in (FrameType.PING, FrameType.GO_AWAY) else 5
    payload = b"xyz" if type_ is FrameType.DATA else b""
    length = 3 if type_ is FrameType.DATA else 0xDEADBEEF
    frame = Frame(type_, Flag(flags), stream_id, length, payload)
    wire = encode(frame)
    assert len(wire) == HEADER_SIZE + len(payload)
    for cuts in ([], list(range(len(wire)))):
        (got,) = decode_in_pieces(wire, cuts)
        assert normalized(got) == normalized(frame)
        assert type(got.type) is FrameType and type(got.flags) is Flag


@given(frames())
@settings(max_examples=600)
def test_round_trip_whole(frame: Frame) -> None:
    wire = encode(frame)
    assert len(wire) == HEADER_SIZE + len(frame.payload)
    assert [normalized(f) for f in decode_in_pieces(wire, [])] == [normalized(frame)]


@given(frames(max_payload=64))
@settings(max_examples=500)
def test_round_trip_one_byte_at_a_time(frame: Frame) -> None:
    wire = encode(frame)
    decoder = FrameDecoder()
    got: list[Frame] = []
    for i in range(len(wire)):
        decoder.feed(wire[i : i + 1])
        frame_or_none = decoder.next_frame()
        if i < len(wire) - 1:
            # nothing comes out early, whatever the frame
            assert frame_or_none is None
        else:
            assert frame_or_none is not None
            got.append(frame_or_none)
    assert [normalized(f) for f in got] == [normalized(frame)]
    assert decoder.buffered == 0


@given(st.lists(frames(), max_size=10), st.binary(max_size=40))
@settings(max_examples=400)
def test_round_trip_of_a_sequence_in_random_splits(seq: list[Frame], sizes: bytes) -> None:
    wire = b"".join(encode(f) for f in seq)
    cuts = cuts_from(sizes, len(wire))
    assert [normalized(f) for f in decode_in_pieces(wire, cuts)] == [normalized(f) for f in seq]


@given(st.lists(frames(max_payload=40), min_size=1, max_size=8))
@settings(max_examples=300)
def test_round_trip_of_a_sequence_one_byte_at_a_time(seq: list[Frame]) -> None:
    wire = b"".join(encode(f) for f in seq)
    got = decode_in_pieces(wire, list(range(len(wire))))
    assert [normalized(f) for f in got] == [normalized(f) for f in seq]


@given(st.lists(frames(), max_size=10), st.binary(max_size=40))
@settings(max_examples=400)
def test_the_callers_buffer_may_be_reused_once_frames_are_taken(
    seq: list[Frame], sizes: bytes
) -> None:
    """As the session does: every read lands in one buffer, overwritten by the next read."""
    wire = b"".join(encode(f) for f in seq)
    buffer = bytearray(max(len(wire), 1))
    view = memoryview(buffer)
    decoder = FrameDecoder()
    got: list[Frame] = []
    start = 0
    for cut in [*sorted(set(cuts_from(sizes, len(wire)))), len(wire)]:
        n = cut - start
        buffer[:] = b"\xee" * len(buffer)  # the last read's bytes are gone
        view[:n] = wire[start:cut]
        decoder.feed(view[:n])
        got.extend(decoder.frames())
        start = cut
    assert [normalized(f) for f in got] == [normalized(f) for f in seq]
    assert decoder.buffered == 0


@given(st.lists(frames(), min_size=1, max_size=6), st.binary(min_size=1, max_size=20))
@settings(max_examples=300)
def test_feeding_again_before_taking_the_frames_loses_nothing(
    seq: list[Frame], sizes: bytes
) -> None:
    wire = b"".join(encode(f) for f in seq)
    decoder = FrameDecoder()
    start = 0
    for cut in [*sorted(set(cuts_from(sizes, len(wire)))), len(wire)]:
        decoder.feed(wire[start:cut])  # no frames taken in between
        start = cut
    assert decoder.buffered == len(wire)
    assert [normalized(f) for f in decoder.frames()] == [normalized(f) for f in seq]
    assert decoder.buffered == 0


def test_payload_survives_later_feeds() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode(Frame(FrameType.DATA, Flag.NONE, 1, 4, b"abcd")) + b"\x00")
    (first,) = decoder.frames()
    decoder.feed(b"\xff" * 40)  # reuses / compacts the decoder's buffer
    assert bytes(first.payload) == b"abcd"


def test_max_payload_is_accepted_and_one_more_is_not() -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_header(FrameType.DATA, Flag.NONE, 1, MAX_PAYLOAD))
    assert decoder.next_frame() is None  # a valid header, waiting for its payload
    decoder.feed(bytes(MAX_PAYLOAD - 1))
    assert decoder.next_frame() is None
    decoder.feed(b"!")
    frame = decoder.next_frame()
    assert frame is not None and frame.length == MAX_PAYLOAD and bytes(frame.payload)[-1:] == b"!"

    decoder = FrameDecoder()
    decoder.feed(encode_header(FrameType.DATA, Flag.NONE, 1, MAX_PAYLOAD + 1))
    with pytest.raises(ProtocolError, match="exceeds"):
        decoder.next_frame()


def test_window_update_length_is_not_a_payload() -> None:
    # a 4 GiB window delta is fine and consumes no bytes after the header
    decoder = FrameDecoder()
    decoder.feed(encode_header(FrameType.WINDOW_UPDATE, Flag.NONE, 3, MAX_U32) + b"\x00")
    frame = decoder.next_frame()
    assert frame == Frame(FrameType.WINDOW_UPDATE, Flag.NONE, 3, MAX_U32)
    assert decoder.buffered == 1


# -- refusals -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (struct.pack("!BBHII", 1, 0, 0, 1, 0), "version"),
        (struct.pack("!BBHII", 255, 2, 1, 0, 0), "version"),
        (struct.pack("!BBHII", VERSION, 4, 0, 1, 0), "unknown frame type"),
        (struct.pack("!BBHII", VERSION, 255, 0, 0, 0), "unknown frame type"),
        (struct.pack("!BBHII", VERSION, 0, 0x10, 1, 0), "unknown flags"),
        (struct.pack("!BBHII", VERSION, 2, 0x8001, 0, 0), "unknown flags"),
        (struct.pack("!BBHII", VERSION, 2, 1, 1, 0), "PING frame on stream 1"),
        (struct.pack("!BBHII", VERSION, 3, 0, 2, 0), "GO_AWAY frame on stream 2"),
        (struct.pack("!BBHII", VERSION, 0, 0, 0, 0), "DATA frame on stream 0"),
        (struct.pack("!BBHII", VERSION, 1, 1, 0, 5), "WINDOW_UPDATE frame on stream 0"),
        (struct.pack("!BBHII", VERSION, 0, 0, 1, 1 << 30), "exceeds"),
        (struct.pack("!BBHII", VERSION, 0, 0, 1, MAX_U32), "exceeds"),
    ],
)
def test_bad_headers_are_refused_after_twelve_bytes(header: bytes, message: str) -> None:
    decoder = FrameDecoder()
    decoder.feed(header[:11])
    assert decoder.next_frame() is None
    decoder.feed(header[11:])  # the header alone: nothing of any payload is awaited
    with pytest.raises(ProtocolError, match=message):
        decoder.next_frame()


def test_a_bad_frame_after_good_ones_yields_the_good_ones_first() -> None:
    good = encode(Frame(FrameType.DATA, Flag.SYN, 1, 2, b"hi"))
    bad = struct.pack("!BBHII", 9, 0, 0, 1, 0)
    decoder = FrameDecoder()
    decoder.feed(good + good + bad)
    assert decoder.next_frame() is not None
    assert decoder.next_frame() is not None
    with pytest.raises(ProtocolError):
        decoder.next_frame()


# -- fuzz -----------------------------------------------------------------------------


def drain(decoder: FrameDecoder, out: list[Frame] | None = None) -> list[Frame]:
    """Every frame the decoder yields (into `out`); a ProtocolError is the only other way out."""
    out = [] if out is None else out
    while True:
        frame = decoder.next_frame()
        if frame is None:
            return out
        assert isinstance(frame, Frame)
        assert isinstance(frame.type, FrameType)
        assert 0 <= int(frame.flags) <= 0xF
        if frame.type is FrameType.DATA:
            assert len(frame.payload) == frame.length <= MAX_PAYLOAD
            assert frame.stream_id != 0
        else:
            assert frame.payload == b""
        out.append(frame)


@given(st.binary(max_size=200), st.binary(max_size=8))
@FUZZ
def test_arbitrary_bytes_give_frames_or_protocol_error(blob: bytes, sizes: bytes) -> None:
    decoder = FrameDecoder()
    frames_out: list[Frame] = []
    start = 0
    try:
        for cut in [*cuts_from(sizes, len(blob)), len(blob)]:
            decoder.feed(blob[start:cut])
            start = cut
            drain(decoder, frames_out)
    except ProtocolError:
        return
    # no error: everything decoded must re-encode to a prefix of the input
    wire = b"".join(encode(f) for f in frames_out)
    assert blob.startswith(wire)
    assert decoder.buffered == len(blob) - len(wire)


@given(st.binary(min_size=HEADER_SIZE, max_size=HEADER_SIZE), st.binary(max_size=64))
@FUZZ
def test_any_header_is_judged_exactly_by_the_rules(header: bytes, tail: bytes) -> None:
    decoder = FrameDecoder()
    decoder.feed(header + tail)
    valid = is_valid_header(header)
    if not valid:
        with pytest.raises(ProtocolError):
            decoder.next_frame()
        return
    _, type_, flags, stream_id, length = struct.unpack("!BBHII", header)
    frame = decoder.next_frame()
    if type_ == 0 and length > len(tail):
        assert frame is None  # waiting for the payload
        assert decoder.buffered == len(tail)
        return
    assert frame is not None
    assert (frame.type, frame.flags, frame.stream_id, frame.length) == (
        FrameType(type_),
        Flag(flags),
        stream_id,
        length,
    )
    assert bytes(frame.payload) == (tail[:length] if type_ == 0 else b"")


def valid_headers(seeds: list[int]) -> bytes:
    """Valid headers, one per seed (one cheap draw each); a data header is followed by
    its payload when the seed says so, else what follows is its payload."""
    blob = b""
    for r in seeds:
        type_ = FrameType(r % 4)
        flags = Flag((r >> 2) % 16)
        session = type_ in (FrameType.PING, FrameType.GO_AWAY)
        stream_id = 0 if session else (r >> 6) % 9 + 1
        length = (r >> 10) % 41 if type_ is FrameType.DATA else (r >> 10) % 100
        blob += encode_header(type_, flags, stream_id, length)
        if type_ is FrameType.DATA and (r >> 20) & 1:
            blob += bytes(length)
    return blob


header_prefix_then_garbage = st.builds(
    lambda seed, garbage: (
        valid_headers([(seed >> (2 + 21 * i)) % (1 << 21) for i in range(seed % 3 + 1)]) + garbage
    ),
    st.integers(0, 1 << 65),
    st.binary(max_size=120),
)


@given(header_prefix_then_garbage, st.binary(max_size=8))
@FUZZ
def test_garbage_after_a_valid_header_gives_frames_or_protocol_error(
    blob: bytes, sizes: bytes
) -> None:
    decoder = FrameDecoder()
    got: list[Frame] = []
    start = 0
    try:
        for cut in [*cuts_from(sizes, len(blob)), len(blob)]:
            decoder.feed(blob[start:cut])
            start = cut
            drain(decoder, got)
    except ProtocolError:
        # the first header is valid: the error is in a later one, after a whole frame
        assert got
        assert len(blob) >= len(encode(got[0])) + HEADER_SIZE
    assert blob.startswith(b"".join(encode(f) for f in got))
