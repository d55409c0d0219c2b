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
MAX_SEND_PAYLOAD = MAX_PAYLOAD  # larger frames cost less per byte on both sides
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


def encode_header(type_: FrameType, flags: int, stream_id: int, length: int) -> bytes:
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


def _check_header(
    version: int, type_: int, flags: int, stream_id: int, length: int
) -> tuple[FrameType, Flag, int, int]:
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
    return frame_type, _FLAGS[flags], stream_id, length


_EMPTY = memoryview(b"")


class FrameDecoder:
    """Feed bytes in, take whole frames out; a broken stream raises ProtocolError.

    Frames are parsed straight from the bytes fed in (a memoryview of the caller's read
    buffer) and each payload is copied out once. When `next_frame` returns None everything
    fed has been taken or copied (a split header, the first part of a payload), so the
    caller may reuse its buffer; a payload split across feeds is joined from its parts,
    never by copying whole feeds into a buffer of our own.
    """

    def __init__(self) -> None:
        self._view = _EMPTY  # the last feed, while it is being parsed
        self._vpos = 0
        self._head = bytearray()  # a header split across feeds
        # A checked header (type, flags, stream id, length) waiting for its payload.
        self._pending: tuple[FrameType, Flag, int, int] | None = None
        self._parts: list[bytes | memoryview] = []  # its payload so far (copies)
        self._have = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._vpos < len(self._view):  # fed again before taking every frame: keep them
            data = b"".join((self._view[self._vpos :], data))
        self._view = memoryview(data).cast("B")
        self._vpos = 0

    @property
    def buffered(self) -> int:
        return len(self._head) + self._have + len(self._view) - self._vpos

    def next_frame(self) -> Frame | None:
        header = self._pending
        if header is None:
            raw = self._take_header()
            if raw is None:
                return None
            header = _check_header(*raw)
            if header[0] is not FrameType.DATA or header[3] == 0:
                return Frame(*header)
        view, pos = self._view, self._vpos
        need = header[3] - self._have
        if len(view) - pos < need:
            if pos < len(view):
                self._parts.append(bytes(view[pos:]))
                self._have += len(view) - pos
            self._release()
            self._pending = header
            return None
        end = pos + need
        if self._parts:
            self._parts.append(view[pos:end])
            payload = b"".join(self._parts)
            self._parts = []
            self._have = 0
        else:
            payload = bytes(view[pos:end])
        self._vpos = end
        self._pending = None
        return Frame(*header, payload)

    def _take_header(self) -> tuple[int, int, int, int, int] | None:
        view, pos = self._view, self._vpos
        head = self._head
        if head:
            take = min(HEADER_SIZE - len(head), len(view) - pos)
            head += view[pos : pos + take]
            self._vpos = pos + take
            if len(head) < HEADER_SIZE:
                self._release()
                return None
            fields = HEADER.unpack(head)
            head.clear()
            return fields
        if len(view) - pos >= HEADER_SIZE:
            self._vpos = pos + HEADER_SIZE
            return HEADER.unpack_from(view, pos)
        head += view[pos:]
        self._release()
        return None

    def _release(self) -> None:
        """All of the last feed is taken: let go of the caller's buffer."""
        self._view = _EMPTY
        self._vpos = 0

    def frames(self) -> list[Frame]:
        out = []
        while (frame := self.next_frame()) is not None:
            out.append(frame)
        return out
