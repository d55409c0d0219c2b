"""The SOCKS side of a -D dynamic forward, without I/O: parse a client's greeting and
request from bytes, build the replies, and turn the peer's refusal into a reply code.

SOCKS5 (RFC 1928) with the no-authentication method only and the CONNECT command only,
addresses as IPv4, domain name (resolved by the peer: `curl --socks5-hostname`) or IPv6;
SOCKS4 and 4a (CONNECT only, the user id ignored) because they cost a few lines.

    Handshake.receive_data(bytes)  ->  data_to_send() (the method choice), then `target`
    once the request is complete and `rest` (any bytes the client sent behind it).
    A client that breaks the protocol raises SocksError carrying the reply to send (maybe
    none) before the connection is closed.

    GREETING --(no-auth offered)--> REQUEST --(CONNECT)--> DONE
        \\--(VER 4: SOCKS4 request)---------------------------/
"""

from __future__ import annotations

import errno
import ipaddress
import os
import struct
from dataclasses import dataclass
from enum import Enum, IntEnum

from tete_tunnel.errors import TeteError

# A greeting is at most 2 + 255 bytes and a request 7 + 255; SOCKS4a's user id and name
# are NUL-terminated, so without a bound a client could make us buffer without end.
MAX_BUFFERED = 1024

NO_AUTH = 0x00
NO_ACCEPTABLE_METHOD = 0xFF
CMD_CONNECT = 0x01
ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6 = 0x01, 0x03, 0x04


class Reply(IntEnum):
    """SOCKS5 reply codes (RFC 1928 §6)."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02  # connection not allowed by ruleset
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


SOCKS4_GRANTED, SOCKS4_REJECTED = 0x5A, 0x5B


class SocksError(TeteError):
    """The client broke the protocol or asked for what we do not do; `reply` goes to it
    (possibly empty) and then the connection is closed."""

    def __init__(self, message: str, reply: bytes = b"") -> None:
        super().__init__(message)
        self.reply = reply


@dataclass(frozen=True)
class Target:
    host: str
    port: int


class State(Enum):
    GREETING = "greeting"
    REQUEST = "request"
    DONE = "done"


def reply5(code: Reply) -> bytes:
    """A SOCKS5 reply; the bound address is always 0.0.0.0:0 (clients do not use it)."""
    return bytes([5, code, 0, ATYP_IPV4]) + bytes(6)


def reply4(granted: bool) -> bytes:
    return bytes([0, SOCKS4_GRANTED if granted else SOCKS4_REJECTED]) + bytes(6)


class Handshake:
    """One client's greeting and request, fed as bytes arrive."""

    def __init__(self) -> None:
        self.state = State.GREETING
        self.version = 5
        self.target: Target | None = None
        self.rest = b""  # what the client sent behind its request
        self._buffer = bytearray()
        self._out = bytearray()

    def data_to_send(self) -> bytes:
        out, self._out = bytes(self._out), bytearray()
        return out

    def receive_data(self, data: bytes) -> None:
        """Take bytes; raises SocksError (the reply in it) if the client broke the protocol."""
        if self.state is State.DONE:
            self.rest += data
            return
        self._buffer += data
        while self.state is not State.DONE:
            step = self._greeting if self.state is State.GREETING else self._request
            used = step(bytes(self._buffer))
            if used == 0:
                if len(self._buffer) > MAX_BUFFERED:
                    raise SocksError(f"a SOCKS {self.state.value} over {MAX_BUFFERED} bytes")
                return
            del self._buffer[:used]
        self.rest, self._buffer = bytes(self._buffer), bytearray()

    def success(self) -> bytes:
        return reply5(Reply.SUCCEEDED) if self.version == 5 else reply4(True)

    def failure(self, code: Reply) -> bytes:
        return reply5(code) if self.version == 5 else reply4(False)

    # -- steps: each returns the bytes it used, 0 while it needs more --------------------

    def _greeting(self, buf: bytes) -> int:
        if not buf:
            return 0
        if buf[0] == 4:
            self.version = 4
            return self._socks4(buf)
        if buf[0] != 5:
            raise SocksError(f"not a SOCKS client (first byte 0x{buf[0]:02x})")
        if len(buf) < 2 or len(buf) < 2 + buf[1]:
            return 0
        methods = buf[2 : 2 + buf[1]]
        if NO_AUTH not in methods:
            raise SocksError(
                "the SOCKS client offers no method we support (only no authentication)",
                bytes([5, NO_ACCEPTABLE_METHOD]),
            )
        self._out += bytes([5, NO_AUTH])
        self.state = State.REQUEST
        return 2 + buf[1]

    def _request(self, buf: bytes) -> int:
        if len(buf) < 4:
            return 0
        version, command, _, atyp = buf[:4]
        if version != 5:
            raise SocksError(
                f"a SOCKS5 request of version {version}", reply5(Reply.GENERAL_FAILURE)
            )
        if command != CMD_CONNECT:
            raise SocksError(
                f"SOCKS command {command} is not supported (only CONNECT)",
                reply5(Reply.COMMAND_NOT_SUPPORTED),
            )
        if atyp == ATYP_IPV4:
            end = 4 + 4
            host = str(ipaddress.IPv4Address(buf[4:end])) if len(buf) >= end else ""
        elif atyp == ATYP_IPV6:
            end = 4 + 16
            host = str(ipaddress.IPv6Address(buf[4:end])) if len(buf) >= end else ""
        elif atyp == ATYP_DOMAIN:
            if len(buf) < 5:
                return 0
            end = 5 + buf[4]
            host = _name(buf[5:end]) if len(buf) >= end else ""
        else:
            raise SocksError(
                f"SOCKS address type {atyp} is not supported",
                reply5(Reply.ADDRESS_TYPE_NOT_SUPPORTED),
            )
        if len(buf) < end + 2:
            return 0
        (port,) = struct.unpack("!H", buf[end : end + 2])
        self._finish(host, port, reply5(Reply.GENERAL_FAILURE))
        return end + 2

    def _socks4(self, buf: bytes) -> int:
        """VN=4 CD DSTPORT DSTIP USERID NUL [HOST NUL if DSTIP is 0.0.0.x, x != 0: 4a]."""
        if len(buf) < 8:
            return 0
        if buf[1] != CMD_CONNECT:
            raise SocksError(
                f"SOCKS4 command {buf[1]} is not supported (only CONNECT)", reply4(False)
            )
        user_end = buf.find(b"\0", 8)
        if user_end < 0:
            return 0
        (port,) = struct.unpack("!H", buf[2:4])
        end = user_end + 1
        if buf[4:7] == b"\0\0\0" and buf[7] != 0:  # 4a: the name follows
            name_end = buf.find(b"\0", end)
            if name_end < 0:
                return 0
            host = _name(buf[end:name_end])
            end = name_end + 1
        else:
            host = str(ipaddress.IPv4Address(buf[4:8]))
        self._finish(host, port, reply4(False))
        return end

    def _finish(self, host: str, port: int, failure: bytes) -> None:
        if not host or port == 0:
            raise SocksError(f"a SOCKS request for {host or 'no host'} port {port}", failure)
        self.target = Target(host, port)
        self.state = State.DONE


def _name(raw: bytes) -> str:
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        return ""
    return name if name.isprintable() and 0 < len(raw) <= 255 else ""


# The peer's REFUSE reasons as `forward` words them (docs/PROTOCOL.md §7): the leading
# words say what failed; after "cannot connect to HOST:PORT: " comes the OS's strerror.
_CONNECT_ERRORS = {
    errno.ECONNREFUSED: Reply.CONNECTION_REFUSED,
    errno.EHOSTUNREACH: Reply.HOST_UNREACHABLE,
    errno.EHOSTDOWN: Reply.HOST_UNREACHABLE,
    errno.ENETUNREACH: Reply.NETWORK_UNREACHABLE,
    errno.ENETDOWN: Reply.NETWORK_UNREACHABLE,
    errno.ETIMEDOUT: Reply.TTL_EXPIRED,
}
_BY_STRERROR = {os.strerror(code).lower(): reply for code, reply in _CONNECT_ERRORS.items()}


def reply_for_refusal(reason: str) -> Reply:
    """The SOCKS reply for the peer's REFUSE reason (general failure when not recognised)."""
    if reason.startswith("connecting to ") and " is not allowed on the peer" in reason:
        return Reply.NOT_ALLOWED
    if reason.startswith("cannot resolve "):
        return Reply.HOST_UNREACHABLE
    if reason.startswith("cannot connect to "):
        cause = reason.rpartition(": ")[2].strip().lower()  # a host name may hold ": "
        if cause in _BY_STRERROR:
            return _BY_STRERROR[cause]
        if "timed out" in cause:
            return Reply.TTL_EXPIRED
    return Reply.GENERAL_FAILURE
