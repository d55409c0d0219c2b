#!/usr/bin/env python3
"""The least a Python forwarder over one TLS link can do: a floor for tete-tunnel's figures.

Not a tool: a yardstick for issue 13 (docs/PERFORMANCE.md, "The Python floor"). It makes
the same hops as `tete-tunnel forward -L` (a listener on one side, one TLS 1.3 link between
two processes, the target connected from the other side, streams multiplexed in frames) on
the same stack (asyncio with uvloop, the loop's own TLS), and nothing else: no flow
control (a stream's bytes are buffered without limit), no authentication of the peer, no
policy, no keepalive, no error reporting. Whatever it costs per connection or per GiB,
tete-tunnel cannot cost less without leaving Python; `compare.py --tools floor` runs it.

    floor.py serve PORT TARGET_HOST TARGET_PORT CERT KEY [socket]   # the connecting side
    floor.py listen PORT PEER_HOST PEER_PORT [socket]               # the -L side

With `socket`, the link's TLS is tete-tunnel's own transport (`tete_tunnel.tlssocket`,
OpenSSL on the socket itself) instead of the loop's (memory BIOs).

A frame is a 9-byte header (stream id u32, kind u8, length u32) and its payload: OPEN
(A to B), DATA, FIN (half-close). A stream ends when both directions have sent FIN.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import sys

HEADER = struct.Struct(">IBI")
OPEN, DATA, FIN = 0, 1, 2


class Link(asyncio.Protocol):
    """One TLS link: frames in, frames out (batched per loop turn)."""

    def __init__(self, side: Side) -> None:
        self.side = side
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.out: list[bytes] = []
        self.scheduled = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(high=1 << 20)
        self.side.link = self

    def pause_writing(self) -> None:  # the one bound on memory: stop reading every client
        self.side.paused = True
        for leg in self.side.legs.values():
            if leg.transport is not None:
                leg.transport.pause_reading()

    def resume_writing(self) -> None:
        self.side.paused = False
        for leg in self.side.legs.values():
            if leg.transport is not None:
                leg.transport.resume_reading()

    def send(self, sid: int, kind: int, payload: bytes = b"") -> None:
        self.out.append(HEADER.pack(sid, kind, len(payload)))
        if payload:
            self.out.append(payload)
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        out, self.out = self.out, []
        assert self.transport is not None
        self.transport.write(b"".join(out))

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        while len(buf) - pos >= 9:
            sid, kind, length = HEADER.unpack_from(buf, pos)
            if len(buf) - pos - 9 < length:
                break
            payload = bytes(buf[pos + 9 : pos + 9 + length])
            pos += 9 + length
            self.side.frame(sid, kind, payload)
        del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.side.done.done():
            self.side.done.set_result(None)


class Leg(asyncio.Protocol):
    """One TCP connection spliced to one stream."""

    def __init__(self, side: Side, sid: int) -> None:
        self.side, self.sid = side, sid
        self.transport: asyncio.Transport | None = None
        self.fins = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.side.paused:
            self.transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.side.link.send(self.sid, DATA, data)

    def eof_received(self) -> bool:
        self.side.link.send(self.sid, FIN)
        self.ended()
        return True

    def from_peer(self, kind: int, payload: bytes) -> None:
        assert self.transport is not None
        if kind == DATA:
            self.transport.write(payload)
        elif kind == FIN:
            self.transport.write_eof()
            self.ended()

    def ended(self) -> None:
        self.fins += 1
        if self.fins == 2:
            assert self.transport is not None
            self.transport.close()
            self.side.legs.pop(self.sid, None)


class Side:
    def __init__(self) -> None:
        self.link: Link = None  # type: ignore[assignment]
        self.legs: dict[int, Leg] = {}
        self.waiting: dict[int, list[tuple[int, bytes]]] = {}
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.next_id = 1
        self.paused = False
        self.target: tuple[str, int] = ("", 0)

    def accepted(self) -> Leg:
        sid, self.next_id = self.next_id, self.next_id + 2
        leg = self.legs[sid] = Leg(self, sid)
        self.link.send(sid, OPEN)
        return leg

    def frame(self, sid: int, kind: int, payload: bytes) -> None:
        if kind == OPEN:
            self.waiting[sid] = []
            asyncio.get_running_loop().create_task(self.connect(sid))
        elif sid in self.waiting:
            self.waiting[sid].append((kind, payload))
        elif (leg := self.legs.get(sid)) is not None:
            leg.from_peer(kind, payload)

    async def connect(self, sid: int) -> None:
        loop = asyncio.get_running_loop()
        leg = Leg(self, sid)
        await loop.create_connection(lambda: leg, *self.target)
        self.legs[sid] = leg
        for kind, payload in self.waiting.pop(sid):
            leg.from_peer(kind, payload)


async def main(argv: list[str]) -> None:
    loop = asyncio.get_running_loop()
    side = Side()
    own_tls = argv[-1] == "socket"
    if own_tls:
        from tete_tunnel import tlssocket
    if argv[0] == "serve":
        port, host, tport, cert, key = argv[1:6]
        side.target = (host, int(tport))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(cert, key)
        if own_tls:
            listener = socket.create_server(("0.0.0.0", int(port)))
            listener.setblocking(False)
            print("ready", flush=True)
            while True:  # the harness's readiness probe connects and closes first
                sock, _ = await loop.sock_accept(listener)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                try:
                    await tlssocket.open_transport(sock, ctx, True, Link(side))
                    break
                except OSError:
                    sock.close()
            listener.close()
            await side.done
            return
        server = await loop.create_server(lambda: Link(side), "0.0.0.0", int(port), ssl=ctx)
        print("ready", flush=True)
        async with server:
            await side.done
    else:
        port, peer, pport = argv[1:4]
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        if own_tls:
            sock = socket.create_connection((peer, int(pport)))
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await tlssocket.open_transport(sock, ctx, False, Link(side))
        else:
            await loop.create_connection(lambda: Link(side), peer, int(pport), ssl=ctx)
        server = await loop.create_server(side.accepted, "127.0.0.1", int(port), backlog=1024)
        print("ready", flush=True)
        async with server:
            await side.done


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(sys.argv[1:]))
