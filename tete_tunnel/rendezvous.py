"""The rendezvous protocol between peers and a relay: encode/decode, names, relay choice.

A relay never sees a secret. Peers meet there under a name:
- pinned IDs (`--peer-id` on both sides): a hash of both fingerprints, which anyone who
  knows both IDs could compute, but which proves nothing and opens nothing;
- a code (`--code 7-purple-sausages`): only its *nameplate*, the leading number, as in
  magic-wormhole. The words stay with the peers; SPAKE2 then proves them end to end, one
  guess per run, over whatever path the relay arranges. A hash of the whole code is never
  sent: a relay could try every code against it offline.

Messages, both ways: `length u16 | JSON object (UTF-8)`, at most MAX_MESSAGE bytes; the
object's "op" says what it is. See docs/PROTOCOL.md §10 for the exchange.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import re
import secrets
import socket
import struct
from dataclasses import dataclass
from typing import Any

from tete_tunnel.errors import TeteError, UsageError

VERSION = 1
DEFAULT_RELAY_PORT = 54320
MAX_MESSAGE = 2048  # a join with a dozen local addresses is ~500 bytes
_LEN = struct.Struct("!H")
_NAMEPLATE = re.compile(r"^([0-9]{1,6})-(.+)$")  # ASCII digits: \d takes any script's
MAX_LOCAL_ADDRESSES = 16


class RendezvousError(TeteError):
    """A malformed or unexpected rendezvous message, or the relay said no."""


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode("utf-8")
    if len(body) > MAX_MESSAGE:
        raise ValueError(f"rendezvous message of {len(body)} bytes exceeds {MAX_MESSAGE}")
    return _LEN.pack(len(body)) + body


def decode_length(header: bytes) -> int:
    (length,) = _LEN.unpack(header)
    if not 0 < length <= MAX_MESSAGE:
        raise RendezvousError(f"rendezvous message of {length} bytes (limit {MAX_MESSAGE})")
    return length


def decode(body: bytes) -> dict[str, Any]:
    try:
        message = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # RecursionError: 2048 bytes hold ~1000 nested brackets, deeper than json.loads goes.
        raise RendezvousError("malformed rendezvous message") from exc
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise RendezvousError("rendezvous message without an op")
    return message


async def send_message(sock: socket.socket, message: dict[str, Any]) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, encode(message))


async def recv_message(sock: socket.socket, sender: str = "the other end") -> dict[str, Any]:
    """Exactly one message, and not a byte more: what follows it may not be ours to read
    (on a data connection, the peer's HELLO right behind the relay's "go")."""
    length = decode_length(await _recv_exactly(sock, 2, sender))
    return decode(await _recv_exactly(sock, length, sender))


async def _recv_exactly(sock: socket.socket, n: int, sender: str) -> bytes:
    loop = asyncio.get_running_loop()
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, n - len(buf))  # never past this message
        if not chunk:
            raise ConnectionError(f"{sender} closed the connection")
        buf += chunk
    return bytes(buf)


class Decoder:
    """Feed bytes, take whole messages; bounded by MAX_MESSAGE per message."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer += data
        out = []
        while len(self._buffer) >= 2:
            length = decode_length(bytes(self._buffer[:2]))
            if len(self._buffer) < 2 + length:
                break
            out.append(decode(bytes(self._buffer[2 : 2 + length])))
            del self._buffer[: 2 + length]
        if len(self._buffer) > 2 + MAX_MESSAGE:
            raise RendezvousError("rendezvous input beyond the message limit")
        return out


# -- addresses ---------------------------------------------------------------------------------


def format_address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def parse_address(text: object) -> tuple[str, int]:
    """`ip:port` or `[v6]:port` from the wire; RendezvousError if it is anything else."""
    if not isinstance(text, str) or len(text) > 64:
        raise RendezvousError(f"bad address {text!r}")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise RendezvousError(f"bad address {text!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise RendezvousError(f"bad address {text!r}") from None
    return host, int(port)


@dataclass(frozen=True)
class RelayAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return format_address(self.host, self.port)


def parse_relays(text: str, option: str = "--via") -> list[RelayAddress]:
    """`HOST[:PORT][,HOST[:PORT]...]`; the port defaults to DEFAULT_RELAY_PORT."""
    relays = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item.startswith("["):
            host, bracket, rest = item[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise UsageError(f"{option} {text!r}: expected [IPV6]:PORT, got {item!r}")
            port_text = rest[1:]
        elif item.count(":") == 1:
            host, port_text = item.split(":")
        else:
            host, port_text = item, ""
            if ":" in host and not _is_ipv6(host):  # `relay:80:90` is no host
                raise UsageError(f"{option} {text!r}: expected HOST:PORT, got {item!r}")
        try:
            port = int(port_text) if port_text else DEFAULT_RELAY_PORT
        except ValueError:
            raise UsageError(f"{option} {text!r}: bad port {port_text!r}") from None
        if not host or not 0 < port < 65536:
            raise UsageError(f"{option} {text!r}: expected HOST:PORT[,HOST:PORT...]")
        relays.append(RelayAddress(host, port))
    if not relays:
        raise UsageError(f"{option} needs at least one relay, HOST:PORT")
    return relays


def _is_ipv6(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 6
    except ValueError:
        return False


# -- names -------------------------------------------------------------------------------------


def name_for_ids(fp_a: bytes, fp_b: bytes) -> str:
    """The rendezvous of two pinned identities: the same on both sides, reveals no secret."""
    lo, hi = sorted([fp_a, fp_b])
    return "id-" + hashlib.sha256(b"tete-tunnel rendezvous" + lo + hi).hexdigest()[:40]


def nameplate_of(code: str) -> str:
    """The public part of a code: its leading number (`7` of `7-purple-sausages`)."""
    match = _NAMEPLATE.match(code.strip())
    if not match:
        raise UsageError(
            f"with --via, a --code starts with a number and a dash, its nameplate (the relay "
            f"sees only that part), e.g. 7-purple-sausages; {code!r} does not"
        )
    return match.group(1).lstrip("0") or "0"


def random_nameplate(digits: int) -> str:
    """A nameplate of exactly `digits` digits (no leading zero), few to type."""
    return str(secrets.randbelow(9 * 10 ** (digits - 1)) + 10 ** (digits - 1))


def name_for_nameplate(nameplate: str) -> str:
    return f"np-{nameplate}"


def valid_name(name: object) -> bool:
    return isinstance(name, str) and (
        bool(re.fullmatch(r"id-[0-9a-f]{40}", name)) or bool(re.fullmatch(r"np-[0-9]{1,6}", name))
    )


def pick_relays(relays: list[RelayAddress], name: str) -> list[RelayAddress]:
    """Rendezvous hashing: both peers order the relays the same way for one name, so they
    meet at the first that is up, with no state shared between relays."""

    def score(relay: RelayAddress) -> bytes:
        return hashlib.sha256(f"{relay.host}:{relay.port}|{name}".encode()).digest()

    return sorted(relays, key=score, reverse=True)
