"""tlssocket's transport over real loopback TCP, on both loops: bytes, ends, backpressure.

The far end is either another of our transports or a blocking `ssl.SSLSocket` in a thread,
which can do what a peer might: stop reading, send close_notify, close with a bare FIN, or
reset the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from typing import Any

import pytest

from tete_tunnel import tlssocket
from tete_tunnel.errors import PeerAborted
from tete_tunnel.identity import Identity, load_or_create
from tete_tunnel.secure import _tls_context
from tete_tunnel.session import linger_zero, link_error

MiB = 1024 * 1024
TCP_CLOSE = 7


@pytest.fixture(scope="module")
def ids(tmp_path_factory: pytest.TempPathFactory) -> tuple[Identity, Identity]:
    base = tmp_path_factory.mktemp("ids")
    return load_or_create(base / "a"), load_or_create(base / "b")


class Collector(asyncio.BufferedProtocol):
    """Hashes what arrives; records the end and the flow-control calls."""

    def __init__(self, keep_open_at_eof: bool = False, buffer_size: int = 256 * 1024) -> None:
        loop = asyncio.get_running_loop()
        self.transport: Any = None
        self.buffer = memoryview(bytearray(buffer_size))
        self.digest = hashlib.sha256()
        self.received = 0
        self.keep_open = keep_open_at_eof
        self.eof = loop.create_future()
        self.lost = loop.create_future()
        self.arrived = asyncio.Event()
        self.paused = False
        self.pauses = 0
        self.resumed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.digest.update(self.buffer[:nbytes])
        self.received += nbytes
        self.arrived.set()

    def eof_received(self) -> bool:
        assert not self.lost.done(), "eof after connection_lost"
        self.eof.set_result(None)
        return self.keep_open

    def connection_lost(self, exc: Exception | None) -> None:
        assert not self.lost.done(), "connection_lost twice"
        self.lost.set_result(exc)

    def pause_writing(self) -> None:
        assert not self.paused
        self.paused = True
        self.pauses += 1
        self.resumed.clear()

    def resume_writing(self) -> None:
        assert self.paused
        self.paused = False
        self.resumed.set()

    async def until(self, n: int) -> None:
        while self.received < n:
            self.arrived.clear()
            if self.lost.done():
                raise AssertionError(f"lost after {self.received} of {n} bytes")
            await self.arrived.wait()


async def send_all(proto: Collector, data: bytes, chunks: list[int], lines: bool = False) -> int:
    """Write `data` in pieces of the given sizes, waiting whenever the transport pauses us
    (with `lines`, three pieces at a time through writelines, as views of `data`);
    returns the most the transport ever held."""
    most, at = 0, 0
    view = memoryview(data)
    step = 3 if lines else 1
    for i in range(0, len(chunks), step):
        while proto.paused:
            await proto.resumed.wait()
        if lines:
            parts = []
            for size in chunks[i : i + step]:
                parts.append(view[at : at + size])
                at += size
            proto.transport.writelines(parts)
        else:
            proto.transport.write(data[at : at + chunks[i]])
            at += chunks[i]
        most = max(most, proto.transport.get_write_buffer_size())
        await asyncio.sleep(0)
    assert at == len(data)
    return most


def pieces(total: int, seed: int, largest: int = 600 * 1024) -> list[int]:
    """Write sizes from 1 byte to `largest`, summing to `total`."""
    rng = random.Random(seed)
    sizes, left = [], total
    while left:
        n = min(left, rng.choice([1, 12, 700, 16 * 1024, 64 * 1024, rng.randint(1, largest)]))
        sizes.append(n)
        left -= n
    return sizes


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    for s in (client, server):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client, server


def contexts(ids: tuple[Identity, Identity]) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(client context for a, server context for b), pinned to each other."""
    a, b = ids
    return _tls_context(a, b.cert_der, False), _tls_context(b, a.cert_der, True)


async def ours(
    sock: socket.socket, ctx: ssl.SSLContext, server: bool, proto: asyncio.BaseProtocol
) -> tlssocket.TLSSocketTransport:
    sock.setblocking(False)
    return await tlssocket.open_transport(sock, ctx, server, proto)


class Peer:
    """A blocking TLS peer in a thread: `script(tls)` runs once the handshake is done."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, server: bool) -> None:
        self.tls = ctx.wrap_socket(
            sock,
            server_side=server,
            do_handshake_on_connect=False,
            suppress_ragged_eofs=False,
            server_hostname=None if server else "tete-tunnel",
        )

    async def handshake(self) -> None:
        await asyncio.to_thread(self.tls.do_handshake)

    async def run(self, script: Callable[[ssl.SSLSocket], Any]) -> Any:
        try:
            return await asyncio.to_thread(script, self.tls)
        finally:
            self.tls.close()


async def peer_pair(
    ids: tuple[Identity, Identity], proto: asyncio.BaseProtocol
) -> tuple[tlssocket.TLSSocketTransport, Peer]:
    """Our transport (TLS client) and a thread peer (TLS server), handshaken."""
    client_ctx, server_ctx = contexts(ids)
    a, b = tcp_pair()
    peer = Peer(b, server_ctx, True)
    transport, _ = await asyncio.gather(ours(a, client_ctx, False, proto), peer.handshake())
    return transport, peer


def read_to_end(tls: ssl.SSLSocket) -> tuple[bytes, str]:
    """Everything until the end, and how it ended: "close_notify" or "bare EOF"."""
    digest, n = hashlib.sha256(), 0
    while True:
        try:
            chunk = tls.recv(MiB)
        except ssl.SSLEOFError:
            return digest.digest() + n.to_bytes(8, "big"), "bare EOF"
        except ssl.SSLZeroReturnError:  # close_notify when it had sent its own already
            chunk = b""
        if not chunk:
            return digest.digest() + n.to_bytes(8, "big"), "close_notify"
        digest.update(chunk)
        n += len(chunk)


def tcp_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def summary(data: bytes) -> bytes:
    return hashlib.sha256(data).digest() + len(data).to_bytes(8, "big")


@pytest.mark.parametrize("lines", [False, True], ids=["write", "writelines"])
def test_large_transfers_both_ways_at_once(ids, run, lines: bool) -> None:
    """32 MiB each way at the same time, written in odd sizes (1 byte to 600 KiB)."""
    up, down = os.urandom(32 * MiB), os.urandom(32 * MiB)

    async def main() -> None:
        client_ctx, server_ctx = contexts(ids)
        a, b = tcp_pair()
        pa, pb = Collector(), Collector()
        ta, tb = await asyncio.gather(ours(a, client_ctx, False, pa), ours(b, server_ctx, True, pb))
        for t in (ta, tb):
            t.set_write_buffer_limits(high=512 * 1024)
        await asyncio.gather(
            send_all(pa, up, pieces(len(up), 1), lines),
            send_all(pb, down, pieces(len(down), 2), lines),
            pa.until(len(down)),
            pb.until(len(up)),
        )
        ta.close()
        assert await pb.eof is None  # close_notify; pb does not keep it open: it closes too
        assert await pa.lost is None
        assert await pb.lost is None
        assert pb.digest.digest() == hashlib.sha256(up).digest()
        assert pa.digest.digest() == hashlib.sha256(down).digest()
        assert pa.received == len(down) and pb.received == len(up)

    run(main())


def test_what_openssl_holds_is_read_though_the_socket_is_quiet(ids, run) -> None:
    """One 10,000-byte record into a 1,000-byte buffer: after the first read the rest sits
    decrypted inside OpenSSL and the socket has nothing to say, so the transport must
    come back for it by itself."""
    data = os.urandom(10_000)

    async def main() -> Collector:
        proto = Collector(buffer_size=1000)
        transport, peer = await peer_pair(ids, proto)
        go = threading.Event()

        def script(tls: ssl.SSLSocket) -> tuple[bytes, str]:
            tls.sendall(data)  # one record
            go.wait()
            return read_to_end(tls)

        running = asyncio.create_task(peer.run(script))
        try:
            await proto.until(len(data))
        finally:
            go.set()
        transport.close()
        assert (await running)[1] == "close_notify"
        assert await proto.lost is None
        return proto

    proto = run(main())
    assert proto.digest.digest() == hashlib.sha256(data).digest()


def test_close_sends_what_is_queued_then_close_notify(ids, run) -> None:
    data = os.urandom(8 * MiB)

    async def main() -> tuple[bytes, str]:
        proto = Collector()
        transport, peer = await peer_pair(ids, proto)

        def script(tls: ssl.SSLSocket) -> tuple[bytes, str]:
            got = read_to_end(tls)
            tls.unwrap()  # answers our close_notify, so our close completes at once
            return got

        reading = asyncio.create_task(peer.run(script))
        transport.write(data)  # queued, mostly: the peer has not read yet
        transport.close()
        transport.write(b"dropped")  # after close, as with asyncio's transport
        got = await reading
        assert await proto.lost is None
        assert not proto.eof.done() or proto.eof.result() is None
        return got

    assert run(main()) == (summary(data), "close_notify")


def test_peer_close_notify_is_eof_then_lost(ids, run) -> None:
    data = os.urandom(4 * MiB)

    async def main() -> Collector:
        proto = Collector()
        _, peer = await peer_pair(ids, proto)

        def script(tls: ssl.SSLSocket) -> None:
            tls.sendall(data)
            tls.unwrap()  # close_notify, then waits for ours

        await peer.run(script)
        assert await proto.lost is None
        return proto

    proto = run(main())
    assert proto.eof.done()
    assert proto.digest.digest() == hashlib.sha256(data).digest()


def test_peer_reset_is_connection_reset(ids, run) -> None:
    async def main() -> BaseException | None:
        proto = Collector()
        _, peer = await peer_pair(ids, proto)

        def script(tls: ssl.SSLSocket) -> None:
            tls.sendall(b"x" * 1000)
            tls.recv(1)  # waits for our byte: the 1000 have been read by then
            tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

        running = asyncio.create_task(peer.run(script))
        await proto.until(1000)
        proto.transport.write(b"!")
        await running  # closed with SO_LINGER 0: an RST
        return await proto.lost

    exc = run(main())
    assert isinstance(exc, ConnectionResetError), repr(exc)
    assert isinstance(link_error(exc), PeerAborted)


def test_bare_fin_is_eof_then_lost(ids, run) -> None:
    """A FIN without close_notify: everything before it, then EOF (not an error), then
    connection_lost(None): what asyncio's transport reports, and the session expects."""
    data = os.urandom(3 * MiB)

    async def main() -> Collector:
        proto = Collector()
        _, peer = await peer_pair(ids, proto)

        def script(tls: ssl.SSLSocket) -> None:
            tls.sendall(data)
            socket.socket.shutdown(tls, socket.SHUT_WR)  # TCP FIN, TLS left alone
            with contextlib.suppress(OSError):  # our side closes in return
                read_to_end(tls)

        await asyncio.gather(peer.run(script), proto.eof)
        assert await proto.lost is None
        return proto

    proto = run(main())
    assert proto.digest.digest() == hashlib.sha256(data).digest()


def test_half_close_we_still_write_after_the_peers_close_notify(ids, run) -> None:
    """The peer sends its data and close_notify and goes on reading: a protocol that keeps
    the transport open at EOF still sends, and our close then ends with close_notify."""
    data, answer = os.urandom(3 * MiB), os.urandom(5 * MiB)

    async def main() -> tuple[bytes, str]:
        proto = Collector(keep_open_at_eof=True)
        transport, peer = await peer_pair(ids, proto)

        def script(tls: ssl.SSLSocket) -> tuple[bytes, str]:
            tls.sendall(data)
            tls.setblocking(False)
            with contextlib.suppress(ssl.SSLWantReadError):
                tls.unwrap()  # our close_notify out; theirs has not come
            tls.setblocking(True)
            return read_to_end(tls)

        reading = asyncio.create_task(peer.run(script))
        await proto.eof
        assert proto.digest.digest() == hashlib.sha256(data).digest()
        assert not transport.is_closing()
        transport.write(answer)
        transport.close()
        got = await reading
        assert await proto.lost is None
        return got

    assert run(main()) == (summary(answer), "close_notify")


def test_a_peer_that_stops_reading_pauses_us_and_memory_stays_bounded(ids, run) -> None:
    chunk = 256 * 1024
    high = 512 * 1024
    total = 48 * MiB
    data = os.urandom(total)

    async def main() -> tuple[bytes, str]:
        proto = Collector()
        transport, peer = await peer_pair(ids, proto)
        transport.set_write_buffer_limits(high=high)
        go = threading.Event()

        def script(tls: ssl.SSLSocket) -> tuple[bytes, str]:
            go.wait()
            got = read_to_end(tls)
            tls.unwrap()
            return got

        reading = asyncio.create_task(peer.run(script))
        try:
            at = 0
            while not proto.paused:  # the kernel's buffers fill, then ours past `high`
                transport.write(data[at : at + chunk])
                at += chunk
                assert at < total, "never paused"
                await asyncio.sleep(0)
            assert transport.get_write_buffer_size() <= high + chunk
            await asyncio.sleep(0.05)  # the loop turns: nothing may grow while paused
            assert proto.paused
            assert transport.get_write_buffer_size() <= high + chunk
        finally:
            go.set()  # the peer reads now (or, on failure, the thread ends)
        most = await send_all(proto, data[at:], [chunk] * ((total - at) // chunk))
        assert most <= high + chunk
        assert proto.pauses >= 1
        transport.close()
        got = await reading
        assert await proto.lost is None
        return got

    assert run(main()) == (summary(data), "close_notify")


def test_abort_drops_the_queue_and_resets_the_peer(ids, run) -> None:
    async def main() -> int:
        proto = Collector()
        transport, peer = await peer_pair(ids, proto)
        go = threading.Event()

        def script(tls: ssl.SSLSocket) -> int:
            go.wait()
            with contextlib.suppress(OSError):  # an RST (which 3.11's ssl calls an EOF)
                while tls.recv(MiB):
                    pass
            return tcp_state(tls)

        reading = asyncio.create_task(peer.run(script))
        try:
            while not proto.paused:
                transport.write(b"\0" * (256 * 1024))
                await asyncio.sleep(0)
            linger_zero(transport.get_extra_info("socket"))
            transport.abort()
            assert transport.is_closing()
            assert transport.get_write_buffer_size() == 0
        finally:
            go.set()
        assert await proto.lost is None
        transport.abort()  # twice: harmless
        return await reading

    assert run(main()) == TCP_CLOSE  # reset: a FIN would leave it in CLOSE_WAIT


def test_extra_info_names_the_tls_session(ids, run) -> None:
    async def main() -> None:
        proto = Collector()
        transport, peer = await peer_pair(ids, proto)
        ssl_object = transport.get_extra_info("ssl_object")
        assert ssl_object.version() == "TLSv1.3"
        assert ssl_object.selected_alpn_protocol() == "tete/1"
        assert ssl_object.getpeercert(binary_form=True) == ids[1].cert_der
        assert transport.get_extra_info("peername")[0] == "127.0.0.1"
        assert transport.get_extra_info("socket").fileno() >= 0
        assert transport.can_write_eof() is False
        transport.close()
        await peer.run(lambda tls: read_to_end(tls) and tls.unwrap())
        assert await proto.lost is None

    run(main())


def test_writelines_joins_only_small_parts_and_ends_records_whole() -> None:
    """Small parts (frame headers, short payloads) are joined with the head of the large
    part behind them up to a record's end; the rest of a large part goes out as it is
    (a view of it: not copied)."""
    record = tlssocket.RECORD
    big1, big2, big3 = os.urandom(300_000), os.urandom(100_000), os.urandom(70_000)
    parts = [b"h" * 12, big1, b"i" * 12, b"d" * 700, big2, big3, b"j" * 12, b"t" * 5]
    out = tlssocket._whole_records(parts)
    assert b"".join(out) == b"".join(parts)
    assert [len(o) for o in out] == [
        record,
        len(big1) - (record - 12),
        record,
        len(big2) - (record - 712),
        len(big3),
        17,
    ]
    for chunk, source in ((out[1], big1), (out[3], big2), (out[4], big3)):
        assert isinstance(chunk, memoryview | bytes)
        assert (chunk.obj if isinstance(chunk, memoryview) else chunk) is source
    assert tlssocket._whole_records([b"only small", b"parts"]) == [b"only smallparts"]
    assert tlssocket._whole_records([big1]) == [big1]


def test_close_while_the_peer_still_sends_is_no_reset(ids, run) -> None:
    """We close while the peer is still writing 64 MiB we never read: its writes go on
    being taken (read and dropped), and it reads what we wrote, then close_notify. Closing
    the socket with its data unread would have reset the connection: its write fails, and
    our last records (a GO_AWAY saying why) may never be read."""

    async def main() -> None:
        proto = Collector()
        transport, peer = await peer_pair(ids, proto)

        def script(tls: ssl.SSLSocket) -> tuple[bytes, str]:
            block = os.urandom(MiB)
            for _ in range(64):  # more than the kernel's buffers hold
                tls.sendall(block)
            return read_to_end(tls)

        peer_done = asyncio.ensure_future(peer.run(script))
        await asyncio.sleep(0.05)  # the peer's data is arriving
        transport.write(b"last words")
        transport.close()
        assert await asyncio.wait_for(peer_done, 30) == (summary(b"last words"), "close_notify")
        assert await asyncio.wait_for(proto.lost, 5) is None

    run(main())
