"""The yamux v0 frame codec: 12-byte header, then a payload for data frames only.

    version u8 | type u8 | flags u16 | stream id u32 | length u32   (big-endian)

The decoder checks every header before it waits for a payload, so a frame announcing a
huge length is refused after 12 bytes, not after buffering it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from tete_tunnel.mux.errors import ProtocolError

VERSION = 0
HEADER = struct.Struct("!BBHII")
HEADER_SIZE = HEADER.size  # 12
# Yamux sets no limit; we refuse data frames over 1 MiB so a peer cannot make us buffer a
# frame larger than this before we can act on it. We send at most MAX_SEND_PAYLOAD.
MAX_PAYLOAD = 1 << 20
MAX_SEND_PAYLOAD = 256 * 1024
MAX_U32 = 0xFFFFFFFF


class FrameType(IntEnum):
    DATA = 0
    WINDOW_UPDATE = 1
    PING = 2
    GO_AWAY = 3


class Flag(IntFlag):
    NONE = 0
    SYN = 1
    ACK = 2
    FIN = 4
    RST = 8


KNOWN_FLAGS = Flag.SYN | Flag.ACK | Flag.FIN | Flag.RST


@dataclass(frozen=True, slots=True)
class Frame:
    type: FrameType
    flags: Flag
    stream_id: int
    length: int  # payload length (data), delta (window update), opaque (ping), code (go away)
    payload: bytes | memoryview = b""


def encode_header(type_: FrameType, flags: Flag, stream_id: int, length: int) -> bytes:
    return HEADER.pack(VERSION, type_, flags, stream_id, length)


def encode(frame: Frame) -> bytes:
    """One frame as bytes (tests and control frames; the hot path writes header + payload)."""
    return encode_header(frame.type, frame.flags, frame.stream_id, frame.length) + bytes(
        frame.payload
    )


_TYPES = {t.value: t for t in FrameType}  # lookups, not Enum construction, per frame
_FLAGS = tuple(Flag(i) for i in range(16))
_PING, _GO_AWAY, _DATA = FrameType.PING.value, FrameType.GO_AWAY.value, FrameType.DATA.value
_UNKNOWN_FLAGS = ~int(KNOWN_FLAGS)  # int: ~ on an IntFlag keeps only its own bits


def _check_header(version: int, type_: int, flags: int, stream_id: int, length: int) -> Frame:
    if version != VERSION:
        raise ProtocolError(f"unsupported mux version {version} (we speak {VERSION})")
    frame_type = _TYPES.get(type_)
    if frame_type is None:
        raise ProtocolError(f"unknown frame type {type_}")
    if flags & _UNKNOWN_FLAGS:
        raise ProtocolError(f"unknown flags {flags:#x} on a {frame_type.name} frame")
    if type_ >= _PING:  # ping, go away
        if stream_id != 0:
            raise ProtocolError(f"{frame_type.name} frame on stream {stream_id}, not 0")
    elif stream_id == 0:
        raise ProtocolError(f"{frame_type.name} frame on stream 0")
    elif type_ == _DATA and length > MAX_PAYLOAD:
        raise ProtocolError(f"data frame of {length} bytes exceeds the {MAX_PAYLOAD}-byte limit")
    return Frame(frame_type, _FLAGS[flags], stream_id, length)


class FrameDecoder:
    """Feed bytes in, take whole frames out; a broken stream raises ProtocolError.

    Frames are parsed straight from the bytes fed in (a memoryview of the caller's read
    buffer) and each payload is copied out once; only a partial frame at the end is kept,
    copied, when `next_frame` returns None or at the next `feed`. So the caller may reuse
    its buffer once it has taken all the frames.
    """

    def __init__(self) -> None:
        self._buf = bytearray()  # a partial frame kept between feeds
        self._pos = 0
        self._view: memoryview | None = None  # the last feed, while it is being parsed
        self._vpos = 0
        self._pending: Frame | None = None  # a checked header waiting for its payload

    def _keep_rest(self) -> None:
        if self._view is not None:
            self._buf = bytearray(self._view[self._vpos :])
            self._pos = 0
            self._view = None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._keep_rest()
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        if self._buf:
            self._buf += data
        else:
            self._view = memoryview(data).cast("B")
            self._vpos = 0

    @property
    def buffered(self) -> int:
        if self._view is not None:
            return len(self._view) - self._vpos
        return len(self._buf) - self._pos

    def next_frame(self) -> Frame | None:
        view = self._view
        if view is not None:
            src, pos = view, self._vpos
        else:
            src, pos = self._buf, self._pos
        frame = self._pending
        if frame is None:
            if len(src) - pos < HEADER_SIZE:
                self._keep_rest()
                return None
            frame = _check_header(*HEADER.unpack_from(src, pos))
            pos += HEADER_SIZE
        if frame.type is not FrameType.DATA or frame.length == 0:
            self._pending = None
        elif len(src) - pos < frame.length:
            self._pending = frame
            self._set_pos(pos)
            self._keep_rest()
            return None
        else:
            self._pending = None
            end = pos + frame.length
            frame = Frame(
                frame.type, frame.flags, frame.stream_id, frame.length, bytes(src[pos:end])
            )
            pos = end
        self._set_pos(pos)
        return frame

    def _set_pos(self, pos: int) -> None:
        if self._view is not None:
            self._vpos = pos
        else:
            self._pos = pos

    def frames(self) -> list[Frame]:
        out = []
        while (frame := self.next_frame()) is not None:
            out.append(frame)
        return out
