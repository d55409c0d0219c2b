"""The pre-TLS handshake messages, HELLO and FINISH: pure encode/parse, no I/O.

Every message is `"TETE" | version u8 | type u8 | body length u16 | body` (big-endian).
The header is checked before any of the body is read, so an oversized or foreign message
is refused after 8 bytes. See docs/PROTOCOL.md for the layout of each body.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from tete_tunnel.errors import HandshakeError


class NotAPeer(HandshakeError):
    """What answered does not speak tete-tunnel at all (another service on that port?)."""


MAGIC = b"TETE"
VERSION = 1
HEADER = struct.Struct("!4sBBH")
HEADER_SIZE = HEADER.size  # 8
MAX_BODY = 4096  # an Ed25519 certificate is ~270 bytes; a few KiB bounds a hostile peer
COMMITMENT_SIZE = 32
NONCE_SIZE = 32
MAC_SIZE = 32
MAX_SPAKE_MESSAGE = 256  # SPAKE2 on Ed25519 sends 33 bytes


class MessageType(IntEnum):
    HELLO = 1
    FINISH = 2
    REFUSE = 3


class RefuseReason(IntEnum):
    ID_MISMATCH = 1  # the sender was given a --peer-id that the receiver's certificate fails
    CODE_MISSING = 2  # the sender uses --code and the receiver sent no code message
    CODE_UNEXPECTED = 3  # the receiver sent a code message but the sender has no --code
    SAME_IDENTITY = 4  # both sides hold the same certificate
    DUPLICATE = 5  # the sender (TLS server) goes on with another connection to the receiver


@dataclass(frozen=True)
class Hello:
    commitment: bytes  # SHA-256 of the nonce revealed in FINISH (for the safety code)
    cert_der: bytes
    spake_message: bytes  # empty unless the sender uses --code


@dataclass(frozen=True)
class Finish:
    nonce: bytes
    mac: bytes  # key confirmation in --code mode, else empty


@dataclass(frozen=True)
class Refuse:
    reason: int  # a RefuseReason, or an unknown value from a newer peer


def _frame(kind: MessageType, body: bytes) -> bytes:
    if len(body) > MAX_BODY:
        raise ValueError(f"{kind.name} body of {len(body)} bytes exceeds {MAX_BODY}")
    return HEADER.pack(MAGIC, VERSION, kind, len(body)) + body


def encode_hello(hello: Hello) -> bytes:
    return _frame(
        MessageType.HELLO,
        hello.commitment
        + struct.pack("!H", len(hello.cert_der))
        + hello.cert_der
        + struct.pack("!H", len(hello.spake_message))
        + hello.spake_message,
    )


def encode_finish(finish: Finish) -> bytes:
    return _frame(MessageType.FINISH, finish.nonce + bytes([len(finish.mac)]) + finish.mac)


def encode_refuse(reason: RefuseReason) -> bytes:
    return _frame(MessageType.REFUSE, bytes([reason]))


def parse_header(header: bytes) -> tuple[MessageType, int]:
    """Check a message header; return its type and body length."""
    if len(header) != HEADER_SIZE:
        raise HandshakeError(f"truncated handshake header ({len(header)} bytes)")
    magic, version, kind, length = HEADER.unpack(header)
    if magic != MAGIC:
        raise NotAPeer(f"not a tete-tunnel peer (it sent {header[:4]!r})")
    if version != VERSION:
        raise HandshakeError(
            f"the peer speaks handshake version {version}, we speak {VERSION}: "
            "use the same tete-tunnel release on both sides"
        )
    try:
        message_type = MessageType(kind)
    except ValueError:
        raise HandshakeError(f"unknown handshake message type {kind}") from None
    if length > MAX_BODY:
        raise HandshakeError(f"handshake message of {length} bytes exceeds {MAX_BODY}")
    return message_type, length


class _Cursor:
    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise HandshakeError(f"truncated {self.what}")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def take_u16_prefixed(self) -> bytes:
        (n,) = struct.unpack("!H", self.take(2))
        return self.take(n)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise HandshakeError(f"{len(self.data) - self.pos} stray bytes after {self.what}")


def parse_hello(body: bytes) -> Hello:
    c = _Cursor(body, "HELLO")
    commitment = c.take(COMMITMENT_SIZE)
    cert_der = c.take_u16_prefixed()
    spake = c.take_u16_prefixed()
    c.end()
    if not cert_der:
        raise HandshakeError("HELLO carries no certificate")
    if len(spake) > MAX_SPAKE_MESSAGE:
        raise HandshakeError(f"HELLO code message of {len(spake)} bytes is too long")
    return Hello(commitment=commitment, cert_der=cert_der, spake_message=spake)


def parse_finish(body: bytes) -> Finish:
    c = _Cursor(body, "FINISH")
    nonce = c.take(NONCE_SIZE)
    mac = c.take(c.take(1)[0])
    c.end()
    if len(mac) not in (0, MAC_SIZE):
        raise HandshakeError(f"FINISH carries a {len(mac)}-byte confirmation, not {MAC_SIZE}")
    return Finish(nonce=nonce, mac=mac)


def parse_refuse(body: bytes) -> Refuse:
    c = _Cursor(body, "REFUSE")
    reason = c.take(1)[0]
    c.end()
    return Refuse(reason=reason)
