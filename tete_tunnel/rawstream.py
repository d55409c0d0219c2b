"""One half-closable byte stream directly over the secure link (until the mux carries pipe).

TLS over asyncio cannot half-close, so data travels in chunks with a 4-byte big-endian
length; length 0 ends our direction (EOF) and 0xFFFFFFFF says we are leaving (BYE).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct

from tete_tunnel.errors import LinkLost
from tete_tunnel.secure import SecureLink

EOF_MARK = 0
BYE_MARK = 0xFFFFFFFF
MAX_CHUNK = 1 << 20
_LEN = struct.Struct("!I")
CLOSE_TIMEOUT = 2.0  # waiting for the peer's close_notify / our buffered data to leave
LINGER = 2.0  # after BYE, how long we read and discard so our close sends no RST


class PeerLeft(Exception):
    """The peer said BYE: it is closing the whole link (not an error)."""


class LinkStream:
    def __init__(self, link: SecureLink) -> None:
        self._reader = link.reader
        self._writer = link.writer
        self._eof_sent = False

    async def read(self) -> bytes:
        try:
            (n,) = _LEN.unpack(await self._reader.readexactly(_LEN.size))
            if n == BYE_MARK:
                raise PeerLeft
            if n > MAX_CHUNK:
                raise LinkLost(f"the peer broke the protocol (a {n}-byte chunk)")
            return await self._reader.readexactly(n) if n else b""
        except (asyncio.IncompleteReadError, ssl.SSLError, OSError) as exc:
            raise LinkLost(f"connection to peer lost: {_why(exc)}") from exc

    async def wait_peer_leaving(self) -> None:
        """After the peer's EOF only BYE or a clean close may follow; both mean it left."""
        try:
            mark = await self._reader.readexactly(_LEN.size)
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise PeerLeft from None
            raise LinkLost("connection to peer lost: a truncated chunk header") from exc
        except (ssl.SSLError, OSError) as exc:
            raise LinkLost(f"connection to peer lost: {_why(exc)}") from exc
        if _LEN.unpack(mark)[0] != BYE_MARK:
            raise LinkLost("the peer broke the protocol (data after its end of data)")
        raise PeerLeft

    async def write(self, data: bytes) -> None:
        for i in range(0, len(data), MAX_CHUNK):
            part = data[i : i + MAX_CHUNK]
            self._writer.write(_LEN.pack(len(part)) + part)
        await self._drain()

    async def write_eof(self) -> None:
        if not self._eof_sent:
            self._eof_sent = True
            self._writer.write(_LEN.pack(EOF_MARK))
            await self._drain()

    async def _drain(self) -> None:
        try:
            await self._writer.drain()
        except (ssl.SSLError, OSError) as exc:
            raise LinkLost(f"connection to peer lost: {_why(exc)}") from exc

    async def goodbye(self) -> None:
        """Leave early: end our data, say BYE, and read until the peer closes (no RST)."""
        with contextlib.suppress(LinkLost, ConnectionError):
            if not self._eof_sent:
                self._writer.write(_LEN.pack(EOF_MARK))
            self._writer.write(_LEN.pack(BYE_MARK))
            await self._drain()
            async with asyncio.timeout(LINGER):
                while await self._reader.read(1 << 16):
                    pass
        await self.close()

    async def abort(self) -> None:
        self._writer.transport.abort()

    async def close(self) -> None:
        self._writer.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self._writer.wait_closed()
        except (TimeoutError, ssl.SSLError, OSError):
            self._writer.transport.abort()


def _why(exc: BaseException) -> str:
    if isinstance(exc, asyncio.IncompleteReadError):
        return "it closed without saying goodbye"
    return str(exc) or type(exc).__name__
