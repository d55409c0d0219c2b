"""A connected transport waiting for its session, and what arrived before it took over.

The handshake reads READY through it; the session then becomes the transport's protocol
(`transport.set_protocol`) and takes the bytes that came in meanwhile. Works the same for a
TLS transport and for a plain socket transport (tests, benchmarks).
"""

from __future__ import annotations

import asyncio
import socket


class Carrier(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.closed = False
        self.error: BaseException | None = None
        self._changed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._changed.set()

    def eof_received(self) -> bool:
        self.eof = True
        self._changed.set()
        return True  # a half-closed carrier is the session's to judge

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.error = exc
        self._changed.set()

    async def read_exactly(self, n: int) -> bytes:
        """The next n bytes; ConnectionError if the connection ends first."""
        while len(self.buffer) < n:
            if self.eof or self.closed:
                raise ConnectionError(
                    f"connection ended after {len(self.buffer)} of {n} bytes"
                ) from self.error
            self._changed.clear()
            await self._changed.wait()
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data


async def plain_carrier(sock: socket.socket) -> Carrier:
    """A carrier over a connected socket without TLS (a socketpair in tests)."""
    sock.setblocking(False)
    _, carrier = await asyncio.get_running_loop().connect_accepted_socket(Carrier, sock)
    return carrier
