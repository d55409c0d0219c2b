"""The asyncio session over real socketpairs: isolation, hostile peers, no leaks."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import socket
import tracemalloc
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import psutil
import pytest

from tete_tunnel.carrier import Carrier, plain_carrier
from tete_tunnel.errors import (
    Closed,
    LinkBroken,
    PeerUnresponsive,
    PeerViolation,
    StreamReset,
)
from tete_tunnel.mux import INITIAL_WINDOW
from tete_tunnel.mux.frames import Flag, FrameDecoder, FrameType, encode_header
from tete_tunnel.session import Session, Stream


async def carriers_pair() -> tuple[Carrier, Carrier]:
    a, b = socket.socketpair()
    return await plain_carrier(a), await plain_carrier(b)


@asynccontextmanager
async def session_pair() -> AsyncIterator[tuple[Session, Session]]:
    ca, cb = await carriers_pair()
    async with Session(ca, client=True) as sa, Session(cb, client=False) as sb:
        yield sa, sb


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


async def read_all(stream: Stream) -> bytes:
    parts = []
    while chunk := await stream.read():
        parts.append(chunk)
    return b"".join(parts)


def test_bytes_both_ways_and_half_close() -> None:
    async def main() -> None:
        async with session_pair() as (sa, sb):
            s = sa.open_stream()
            s.write(b"request")
            s.write_eof()
            t = await sb.accept()
            assert await read_all(t) == b"request"
            t.write(b"reply after EOF")  # half-close: the other direction still works
            t.write_eof()
            assert await read_all(s) == b"reply after EOF"
            await asyncio.wait_for(s.wait_closed(), 5)
            await asyncio.wait_for(t.wait_closed(), 5)
            assert sa.conn.stream_ids == [] and sb.conn.stream_ids == []

    run(main())


def test_blocked_reader_does_not_slow_another_stream() -> None:
    """Stream 1's reader never reads; stream 2 still moves 64 MiB; stream 1 stays in window."""

    async def main() -> None:
        async with session_pair() as (sa, sb):
            blocked = sa.open_stream()
            blocked_in = None
            payload = os.urandom(1 << 20)

            async def flood_blocked() -> None:
                while True:  # more than any window: its writer must end up waiting
                    blocked.write(payload)
                    await blocked.drain()

            flooder = asyncio.create_task(flood_blocked())
            blocked_in = await sb.accept()  # accepted, never read
            fast = sa.open_stream()
            fast_in = await sb.accept()
            total = 64 << 20
            digest = hashlib.sha256()

            async def send() -> None:
                for _ in range(total // len(payload)):
                    fast.write(payload)
                    await fast.drain()
                fast.write_eof()

            async def receive() -> int:
                n = 0
                while chunk := await fast_in.read():
                    digest.update(chunk)
                    n += len(chunk)
                return n

            try:
                _, received = await asyncio.gather(send(), receive())
            finally:
                flooder.cancel()
                await asyncio.gather(flooder, return_exceptions=True)
            assert received == total
            assert digest.digest() == hashlib.sha256(payload * (total // len(payload))).digest()
            # The blocked stream holds no more than the window it granted.
            assert 0 < blocked_in._buffered <= INITIAL_WINDOW
            blocked.reset()

    run(main())


def test_ten_thousand_streams_in_sequence_and_a_thousand_at_once_leak_nothing() -> None:
    proc = psutil.Process()

    async def echo_server(sb: Session, count: int) -> None:
        async with asyncio.TaskGroup() as tg:
            for _ in range(count):
                t = await sb.accept()
                tg.create_task(echo(t))

    async def echo(t: Stream) -> None:
        data = await read_all(t)
        t.write(data)
        t.write_eof()
        await t.wait_closed()

    async def client(sa: Session, i: int) -> None:
        s = sa.open_stream()
        msg = f"stream {i} ".encode() * 10
        s.write(msg)
        s.write_eof()
        assert await read_all(s) == msg
        await s.wait_closed()

    async def main() -> tuple[int, int]:
        async with session_pair() as (sa, sb):
            fds_before = proc.num_fds()
            tasks_before = len(asyncio.all_tasks())
            server = asyncio.create_task(echo_server(sb, 10_000 + 1_000))
            for i in range(10_000):
                await client(sa, i)
            await asyncio.gather(*(client(sa, i) for i in range(1_000)))
            await asyncio.wait_for(server, 30)
            await asyncio.sleep(0.1)
            assert sa.conn.stream_ids == [] and sb.conn.stream_ids == []
            assert sa._streams == {} and sb._streams == {}
            assert len(asyncio.all_tasks()) == tasks_before
            return fds_before, proc.num_fds()

    before, after = run(main())
    assert after == before


async def hostile_pair(max_streams: int | None = None) -> tuple[Session, socket.socket]:
    from tete_tunnel.mux import Config

    a, b = socket.socketpair()
    b.setblocking(True)
    config = Config(max_streams=max_streams) if max_streams else None
    session = Session(await plain_carrier(a), client=True, config=config)
    return session, b


def read_goaway(sock: socket.socket) -> int:
    """Read frames the honest side sent until its go-away; return the go-away code."""
    sock.settimeout(10)
    decoder = FrameDecoder()
    while True:
        data = sock.recv(1 << 16)
        assert data, "the honest side closed without a go-away"
        decoder.feed(data)
        for frame in decoder.frames():
            if frame.type is FrameType.GO_AWAY:
                return frame.length


@pytest.mark.parametrize(
    "attack",
    ["beyond-window", "huge-length", "bad-version", "unknown-type", "wrong-parity"],
)
def test_hostile_peer_is_cut_off_with_go_away(attack: str) -> None:
    async def main() -> tuple[int, BaseException | None, int]:
        session, raw = await hostile_pair()
        tracemalloc.start()
        async with session:
            if attack == "beyond-window":
                frame = encode_header(FrameType.DATA, Flag.SYN, 2, INITIAL_WINDOW + 1)
                frame += b"x" * (INITIAL_WINDOW + 1)
            elif attack == "huge-length":
                frame = encode_header(FrameType.DATA, Flag.SYN, 2, 1 << 30) + b"x" * 1000
            elif attack == "bad-version":
                frame = b"\x01" + encode_header(FrameType.PING, Flag.SYN, 0, 1)[1:]
            elif attack == "unknown-type":
                frame = b"\x00\x07" + encode_header(FrameType.PING, Flag.SYN, 0, 1)[2:]
            else:  # the server side opening an odd (client) stream id
                frame = encode_header(FrameType.WINDOW_UPDATE, Flag.SYN, 1, 0)
            await asyncio.to_thread(raw.sendall, frame)
            code = await asyncio.to_thread(read_goaway, raw)
            await asyncio.wait_for(session.ended.wait(), 10)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        raw.close()
        return code, session.error, peak

    code, error, peak = run(main())
    assert code == 1  # PROTOCOL_ERROR
    assert isinstance(error, PeerViolation) and "protocol error" in str(error)
    assert peak < 8 << 20, f"honest side allocated {peak} bytes under attack"


def test_open_flood_past_the_limit_is_refused_then_cut_off() -> None:
    async def main() -> tuple[int, int, BaseException | None, int]:
        session, raw = await hostile_pair(max_streams=64)
        tracemalloc.start()
        resets = 0
        async with session:
            opens = b"".join(
                encode_header(FrameType.WINDOW_UPDATE, Flag.SYN, 2 * i, 0) for i in range(1, 5001)
            )
            sender = asyncio.create_task(asyncio.to_thread(raw.sendall, opens))
            raw.settimeout(10)
            decoder = FrameDecoder()
            code = -1
            while code < 0:
                data = await asyncio.to_thread(raw.recv, 1 << 16)
                if not data:
                    break
                decoder.feed(data)
                for frame in decoder.frames():
                    if frame.flags & Flag.RST:
                        resets += 1
                    if frame.type is FrameType.GO_AWAY:
                        code = frame.length
            await asyncio.wait_for(session.ended.wait(), 10)
            assert len(session.conn.stream_ids) <= 64
            raw.shutdown(socket.SHUT_RDWR)
            await asyncio.gather(sender, return_exceptions=True)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        raw.close()
        return code, resets, session.error, peak

    code, resets, error, peak = run(main())
    assert resets > 0  # excess opens were answered with RST first
    assert code == 1
    assert isinstance(error, PeerViolation)
    assert peak < 16 << 20


def test_orderly_close_tells_the_peer() -> None:
    async def main() -> None:
        async with session_pair() as (sa, sb):
            s = sa.open_stream()
            t = await sb.accept()
            await sa.close()
            with pytest.raises(Closed):
                await t.read()
            await asyncio.wait_for(sb.ended.wait(), 5)
            assert sb.error is None and sb.peer_confirmed
            with pytest.raises(Closed):
                s.write(b"late")

    run(main())


def test_keepalive_detects_a_silent_peer() -> None:
    from tete_tunnel.mux import Config

    async def main() -> BaseException | None:
        a, b = socket.socketpair()
        config = Config(keepalive_interval=0.2, keepalive_timeout=0.6)
        async with Session(await plain_carrier(a), client=True, config=config) as session:
            # b is never read: pings go unanswered, as with a dead peer or a cut link.
            await asyncio.wait_for(session.ended.wait(), 10)
        b.close()
        return session.error

    error = run(main())
    assert isinstance(error, PeerUnresponsive) and "answered no ping" in str(error)


def test_pings_are_not_starved_by_bulk_data() -> None:
    from tete_tunnel.mux import Config

    async def main() -> list[float]:
        ca, cb = await carriers_pair()
        config = Config(keepalive_interval=0.05, keepalive_timeout=5)
        rtts: list[float] = []
        async with (
            Session(ca, client=True, config=config) as sa,
            Session(cb, client=False) as sb,
        ):
            s = sa.open_stream()
            t = await sb.accept()
            payload = os.urandom(1 << 20)

            async def bulk() -> None:
                for _ in range(200):
                    s.write(payload)
                    await s.drain()
                s.write_eof()

            async def sink() -> None:
                while await t.read():
                    pass

            original = sa._dispatch

            def spy(events: list) -> None:
                from tete_tunnel.mux import events as ev

                rtts.extend(e.rtt for e in events if isinstance(e, ev.PongReceived))
                original(events)

            sa._dispatch = spy  # type: ignore[method-assign]
            await asyncio.gather(bulk(), sink())
        return rtts

    rtts = run(main())
    assert len(rtts) >= 3, "keepalive pings did not get through during bulk transfer"
    assert max(rtts) < 2.0


def test_memory_of_ten_thousand_sequential_streams_is_flat() -> None:
    async def main() -> tuple[int, int]:
        async with session_pair() as (sa, sb):

            async def serve() -> None:
                while True:
                    try:
                        t = await sb.accept()
                    except (Closed, LinkBroken):
                        return
                    t.write(await read_all(t))
                    t.write_eof()

            server = asyncio.create_task(serve())
            sizes = []
            for round_ in range(2):
                for _ in range(2000):
                    s = sa.open_stream()
                    s.write(b"x" * 100)
                    s.write_eof()
                    await read_all(s)
                gc.collect()
                sizes.append(tracemalloc.get_traced_memory()[0])
                del round_
            server.cancel()
            await asyncio.gather(server, return_exceptions=True)
            return sizes[0], sizes[1]

    tracemalloc.start()
    try:
        first, second = run(main())
    finally:
        tracemalloc.stop()
    assert second - first < 1 << 20, (first, second)


def test_close_after_delivery_loses_nothing_with_a_slow_reader() -> None:
    """Regression: a go-away must not overtake a stream's queued tail and FIN.

    The writer ends its stream, waits until it is closed both ways (what pipe does), then
    closes the session; the slow reader on the other side still gets every byte and EOF.
    """
    total = 4 << 20
    payload = os.urandom(total)

    async def main() -> bytes:
        async with session_pair() as (sa, sb):
            s = sa.open_stream()

            async def sender() -> None:
                s.write(payload)
                s.write_eof()
                while await s.read():  # the peer's FIN, as pipe waits for it
                    pass
                await asyncio.wait_for(s.wait_closed(), 30)
                await sa.close()

            async def receiver() -> bytes:
                t = await sb.accept()
                t.write_eof()
                parts = []
                while True:
                    await asyncio.sleep(0.002)  # a slow consumer downstream
                    chunk = await t.read(65536)
                    if not chunk:
                        return b"".join(parts)
                    parts.append(chunk)

            _, got = await asyncio.gather(sender(), receiver())
            return got

    got = run(main())
    assert len(got) == total
    assert got == payload


def test_close_never_passes_an_abandoned_stream_off_as_complete() -> None:
    async def main() -> None:
        async with session_pair() as (sa, sb):
            s = sa.open_stream()
            s.write(b"x" * (2 << 20))  # more than the window: some stays queued
            t = await sb.accept()
            await sa.close()
            # The peer sees the abandoned stream end with the session, and never mistakes
            # the cut for a complete transfer (no clean EOF).
            with pytest.raises((Closed, LinkBroken, StreamReset)):
                while await t.read():
                    pass

    run(main())


def test_memory_goes_back_to_the_kernel_once_a_burst_is_over(monkeypatch) -> None:
    """Issue 13, memory at rest: after RELEASE_AFTER bytes, RELEASE_IDLE seconds without
    traffic release the heap once (and not again while nothing moves)."""
    from tete_tunnel import session as session_module

    monkeypatch.setattr(session_module, "RELEASE_IDLE", 1.0)
    monkeypatch.setattr(session_module, "RELEASE_AFTER", 4 << 20)

    async def main() -> tuple[int, int, int]:
        async with session_pair() as (sa, sb):
            s = sa.open_stream()
            payload = os.urandom(6 << 20)
            s.write(payload)
            s.write_eof()
            t = await sb.accept()
            assert hashlib.sha256(await read_all(t)).digest() == hashlib.sha256(payload).digest()
            during = sa.memory_releases, sb.memory_releases
            for _ in range(200):  # idle: one release (within a second or two) ...
                if sa.memory_releases:
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(2.5)  # ... and not another, with nothing more to give back
            after = sa.memory_releases
            t.write(b"a little")  # well under RELEASE_AFTER: no new release
            t.write_eof()
            assert await read_all(s) == b"a little"
            await asyncio.sleep(2.5)
            return sum(during), after, sa.memory_releases

    during, after, later = run(main())
    assert (during, after, later) == (0, 1, 1)


def test_release_free_memory_shrinks_a_tuned_heap() -> None:
    """With tune_malloc's thresholds glibc keeps freed buffers; the release gives them back."""
    probe = """
import os
from tete_tunnel.malloc import release_free_memory, tune_malloc
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
assert tune_malloc()
chunks = [bytearray(256 << 10) for _ in range(256)]  # 64 MiB on the heap, touched
del chunks
held = rss()
release_free_memory()
print(held - rss())
"""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 48 << 20


async def _until(predicate: Callable[[], bool]) -> None:
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("not within 10 s")


class _TakeHead:
    """A consumer that takes the first `n` bytes and gives the stream back."""

    def __init__(self, stream: Stream, n: int) -> None:
        self.stream, self.n, self.head = stream, n, b""

    def stream_data(self, data: bytes) -> None:
        assert len(self.head) < self.n, "data reached the consumer that gave the stream back"
        data = self.head + data
        if len(data) < self.n:
            self.head = data
            return
        self.head = data[: self.n]
        self.stream.credit(self.n)
        self.stream.detach(data[self.n :])

    def stream_eof(self) -> None:
        raise AssertionError("the end reached the consumer that had given the stream back")

    def stream_error(self, error: BaseException) -> None:
        raise AssertionError(f"error {error!r} reached the consumer that gave the stream back")


@pytest.mark.parametrize("before", [True, False], ids=["opened-before", "opened-after"])
def test_served_streams_are_handed_over_and_a_consumer_may_give_one_back(before: bool) -> None:
    """serve_streams: each stream the peer opens goes to the handler, those that came
    before it too (their data already buffered); a consumer that detaches inside its
    first data leaves the rest, and the end, for read()."""

    async def main() -> None:
        async with session_pair() as (sa, sb):
            served: list[tuple[Stream, _TakeHead]] = []

            def handler(stream: Stream) -> None:
                taker = _TakeHead(stream, 4)
                served.append((stream, taker))
                stream.attach(taker)

            def open_streams() -> list[Stream]:
                opened = []
                for i in range(3):
                    s = sa.open_stream()
                    s.write(b"HEAD" + b"rest %d" % i)
                    s.write_eof()
                    opened.append(s)
                return opened

            if before:
                opened = open_streams()
                await _until(lambda: len(sb.conn.stream_ids) == 3)  # unaccepted, waiting
                sb.serve_streams(handler)
            else:
                sb.serve_streams(handler)
                opened = open_streams()
            await _until(lambda: len(served) == 3 and all(s.peer_ended for s, _ in served))
            for i, (stream, taker) in enumerate(served):
                assert taker.head == b"HEAD"
                assert await read_all(stream) == b"rest %d" % i
                stream.write(b"answer")
                stream.write_eof()
            for s in opened:
                assert await read_all(s) == b"answer"
            assert sb.streams_opened == 3

    asyncio.run(asyncio.wait_for(main(), 20))
