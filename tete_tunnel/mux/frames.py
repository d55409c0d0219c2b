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


def _check_header(version: int, type_: int, flags: int, stream_id: int, length: int) -> Frame:
    if version != VERSION:
        raise ProtocolError(f"unsupported mux version {version} (we speak {VERSION})")
    try:
        frame_type = FrameType(type_)
    except ValueError:
        raise ProtocolError(f"unknown frame type {type_}") from None
    if flags & ~int(KNOWN_FLAGS):  # int: ~ on an IntFlag keeps only its own bits
        raise ProtocolError(f"unknown flags {flags:#x} on a {frame_type.name} frame")
    if frame_type in (FrameType.PING, FrameType.GO_AWAY) and stream_id != 0:
        raise ProtocolError(f"{frame_type.name} frame on stream {stream_id}, not 0")
    if frame_type in (FrameType.DATA, FrameType.WINDOW_UPDATE) and stream_id == 0:
        raise ProtocolError(f"{frame_type.name} frame on stream 0")
    if frame_type == FrameType.DATA and length > MAX_PAYLOAD:
        raise ProtocolError(f"data frame of {length} bytes exceeds the {MAX_PAYLOAD}-byte limit")
    return Frame(frame_type, Flag(flags), stream_id, length)


class FrameDecoder:
    """Feed bytes in, take whole frames out; a broken stream raises ProtocolError.

    Payloads are returned as memoryviews into buffers the decoder no longer touches, so
    handing them to a consumer costs no copy.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        self._pending: Frame | None = None  # a checked header waiting for its payload

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def next_frame(self) -> Frame | None:
        buf = self._buf
        if self._pending is None:
            if len(buf) - self._pos < HEADER_SIZE:
                return None
            header = HEADER.unpack_from(buf, self._pos)
            self._pos += HEADER_SIZE
            self._pending = _check_header(*header)
        frame = self._pending
        if frame.type != FrameType.DATA or frame.length == 0:
            self._pending = None
            return frame
        if len(buf) - self._pos < frame.length:
            return None
        payload = bytes(buf[self._pos : self._pos + frame.length])
        self._pos += frame.length
        self._pending = None
        return Frame(frame.type, frame.flags, frame.stream_id, frame.length, payload)

    def frames(self) -> list[Frame]:
        out = []
        while (frame := self.next_frame()) is not None:
            out.append(frame)
        return out
