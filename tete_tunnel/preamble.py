"""The open request that starts every stream, and its answer.

The opener sends the request and may send data right behind it (no round trip); the
acceptor answers ACCEPT or REFUSE with a reason before any data of its own. Both are
`length u16 | kind u8 | body` (big-endian), length counting kind and body.

    PIPE                       (no body)
    CONNECT    port u16 | host (UTF-8)      connect to host:port on the acceptor's side
    FORWARDED  listener u32                 a connection arrived at a -R listener
    LISTEN     port u16 | host (UTF-8)      listen on host:port on the acceptor's side (-R);
                                            the stream stays open as long as the listener
    ACCEPT     (no body)
    BOUND      port u16                     LISTEN's success: the port actually bound
    REFUSE     reason (UTF-8)
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Protocol

from tete_tunnel.errors import TeteError

MAX_LENGTH = 1024  # a host name is at most 255 bytes; a reason a short sentence
_LEN = struct.Struct("!H")


class Kind(IntEnum):
    PIPE = 1
    CONNECT = 2
    FORWARDED = 3
    LISTEN = 4
    ACCEPT = 0x80
    REFUSE = 0x81
    BOUND = 0x82


class PreambleError(TeteError):
    """A malformed open request or answer: the stream is reset."""


@dataclass(frozen=True)
class Pipe:
    pass


@dataclass(frozen=True)
class Connect:
    host: str
    port: int


@dataclass(frozen=True)
class Forwarded:
    listener_id: int


@dataclass(frozen=True)
class Listen:
    host: str
    port: int  # 0: the acceptor picks a free port and reports it in BOUND


@dataclass(frozen=True)
class Accept:
    pass


@dataclass(frozen=True)
class Bound:
    port: int


@dataclass(frozen=True)
class Refuse:
    reason: str


Request = Pipe | Connect | Forwarded | Listen
Answer = Accept | Bound | Refuse


def encode(message: Request | Answer) -> bytes:
    match message:
        case Pipe():
            body = bytes([Kind.PIPE])
        case Connect(host, port):
            name = host.encode("utf-8")
            if not name or len(name) > 255 or not 0 < port < 65536:
                raise ValueError(f"bad connect target {host!r}:{port}")
            body = bytes([Kind.CONNECT]) + _LEN.pack(port) + name
        case Forwarded(listener_id):
            body = bytes([Kind.FORWARDED]) + struct.pack("!I", listener_id)
        case Listen(host, port):
            name = host.encode("utf-8")
            if not name or len(name) > 255 or not 0 <= port < 65536:
                raise ValueError(f"bad listen address {host!r}:{port}")
            body = bytes([Kind.LISTEN]) + _LEN.pack(port) + name
        case Accept():
            body = bytes([Kind.ACCEPT])
        case Bound(port):
            body = bytes([Kind.BOUND]) + _LEN.pack(port)
        case Refuse(reason):
            body = bytes([Kind.REFUSE]) + reason.encode("utf-8")[: MAX_LENGTH - 1]
    return _LEN.pack(len(body)) + body


def decode(body: bytes) -> Request | Answer:
    """Decode one message body (after its length); PreambleError if malformed."""
    if not body:
        raise PreambleError("empty open request")
    kind, rest = body[0], body[1:]
    try:
        if kind == Kind.PIPE and not rest:
            return Pipe()
        if kind == Kind.CONNECT and len(rest) >= 3:
            (port,) = _LEN.unpack(rest[:2])
            host = rest[2:].decode("utf-8")
            if 0 < port and 0 < len(rest) - 2 <= 255 and host.isprintable():
                return Connect(host, port)
        if kind == Kind.FORWARDED and len(rest) == 4:
            return Forwarded(struct.unpack("!I", rest)[0])
        if kind == Kind.LISTEN and len(rest) >= 3:
            (port,) = _LEN.unpack(rest[:2])
            host = rest[2:].decode("utf-8")
            if len(rest) - 2 <= 255 and host.isprintable():
                return Listen(host, port)
        if kind == Kind.ACCEPT and not rest:
            return Accept()
        if kind == Kind.BOUND and len(rest) == 2:
            return Bound(_LEN.unpack(rest)[0])
        if kind == Kind.REFUSE:
            return Refuse(rest.decode("utf-8", errors="replace"))
    except UnicodeDecodeError:
        pass
    raise PreambleError(f"malformed open message (kind {kind}, {len(rest)} bytes)")


def parse(data: bytes) -> tuple[Request | Answer, int] | None:
    """The message at the start of `data` and the bytes it took, or None while it is not
    all there; PreambleError if it is malformed (a bad length is known after 2 bytes)."""
    if len(data) < 2:
        return None
    (length,) = _LEN.unpack_from(data)
    if not 0 < length <= MAX_LENGTH:
        raise PreambleError(f"open message of {length} bytes (limit {MAX_LENGTH})")
    if len(data) < 2 + length:
        return None
    return decode(data[2 : 2 + length]), 2 + length


class ByteReader(Protocol):
    """What reading a preamble needs of a stream."""

    async def readexactly(self, n: int) -> bytes: ...


async def read_message(stream: ByteReader) -> Request | Answer:
    try:
        (length,) = _LEN.unpack(await stream.readexactly(2))
        if not 0 < length <= MAX_LENGTH:
            raise PreambleError(f"open message of {length} bytes (limit {MAX_LENGTH})")
        return decode(await stream.readexactly(length))
    except asyncio.IncompleteReadError as exc:
        raise PreambleError("the stream ended inside its open message") from exc


class Answerable(Protocol):
    """What refusing needs of a stream."""

    def write(self, data: bytes) -> None: ...
    def close(self) -> None: ...


def refuse(stream: Answerable, reason: str) -> None:
    """Answer an open request with REFUSE and end our side (the opener resets its client)."""
    stream.write(encode(Refuse(reason)))
    stream.close()
