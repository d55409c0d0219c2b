#!/usr/bin/env python3
"""The TLS link alone: bulk bytes through asyncio's TLS transport vs tlssocket's.

Not a test: two processes (sender, receiver) over loopback TCP, each with its own loop,
move --mib MiB one way through the transport under test and print wall time and each
process's CPU time per GiB. Isolates the transport from the mux and the forwards, so A/B
runs of the two transports differ only in it. Run from the repository root:

    python benchmarks/tls_transport.py [--mib 1024] [--runs 3] [--loop uvloop|asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tete_tunnel import tlssocket
from tete_tunnel.identity import load_or_create
from tete_tunnel.secure import _tls_context

WRITE = 512 * 1024  # what the session writes at a time (session.WRITE_BATCH)
READ = 1024 * 1024  # the session's read buffer (session.READ_BUFFER)
HIGH_WATER = 512 * 1024  # session.TRANSPORT_HIGH_WATER


class Sender(asyncio.Protocol):
    def __init__(self, total: int) -> None:
        self.left = total
        self.chunk = os.urandom(WRITE)
        self.paused = False
        self.done = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def pump(self) -> None:
        assert self.transport is not None
        while self.left > 0 and not self.paused:
            self.transport.write(self.chunk)
            self.left -= len(self.chunk)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self.pump()

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        """The receiver closes once it has everything: the end of the sender's run."""
        if not self.done.done():
            self.done.set_result(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError("lost"))


class Receiver(asyncio.BufferedProtocol):
    def __init__(self, total: int) -> None:
        self.left = total
        self.buffer = memoryview(bytearray(READ))
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.left -= nbytes
        if self.left <= 0 and not self.done.done():
            self.done.set_result(None)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError("lost early"))


async def side(kind: str, sock: socket.socket, ctx, server: bool, total: int, send: bool):
    loop = asyncio.get_running_loop()
    proto = Sender(total) if send else Receiver(total)
    if kind == "asyncio-ssl":
        if server:
            transport, _ = await loop.connect_accepted_socket(lambda: proto, sock, ssl=ctx)
        else:
            transport, _ = await loop.create_connection(
                lambda: proto, sock=sock, ssl=ctx, server_hostname="tete-tunnel"
            )
        transport = proto.transport
    else:
        await tlssocket.open_transport(sock, ctx, server, proto)
        transport = proto.transport
    transport.set_write_buffer_limits(high=HIGH_WATER)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if send:
        proto.pump()
    await proto.done  # the sender's ends when the receiver closes, having it all
    elapsed = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    transport.close()
    await asyncio.sleep(0.05)
    return elapsed, cpu1.ru_utime - cpu0.ru_utime, cpu1.ru_stime - cpu0.ru_stime


def child(kind, loop_name, sock, ctx_args, server, total, send, out) -> None:
    identity_dir, peer_dir = ctx_args
    me, peer = load_or_create(Path(identity_dir)), load_or_create(Path(peer_dir))
    ctx = _tls_context(me, peer.cert_der, server)
    sock.setblocking(False)
    coro = side(kind, sock, ctx, server, total, send)
    if loop_name == "uvloop":
        import uvloop

        result = uvloop.run(coro)
    else:
        result = asyncio.run(coro)
    out.send(result)


def one(kind: str, loop_name: str, total: int, tmp: str) -> tuple[float, float, float]:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    for s in (client, server):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    a_out, a_in = multiprocessing.Pipe()
    b_out, b_in = multiprocessing.Pipe()
    ids = (f"{tmp}/a", f"{tmp}/b")
    pa = multiprocessing.Process(
        target=child, args=(kind, loop_name, client, ids, False, total, True, a_in)
    )
    pb = multiprocessing.Process(
        target=child, args=(kind, loop_name, server, ids[::-1], True, total, False, b_in)
    )
    pa.start()
    pb.start()
    client.close()
    server.close()
    ra, rb = a_out.recv(), b_out.recv()
    pa.join()
    pb.join()
    gib = total / 2**30
    wall = max(ra[0], rb[0])
    return total / wall / 1e6, (ra[1] + ra[2]) / gib, (rb[1] + rb[2]) / gib, ra, rb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--loop", default="uvloop", choices=["uvloop", "asyncio"])
    parser.add_argument("--kinds", default="asyncio-ssl,tlssocket")
    args = parser.parse_args()
    multiprocessing.set_start_method("fork")
    total = args.mib << 20
    kinds = args.kinds.split(",")
    results: dict[str, list] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        load_or_create(Path(tmp) / "a")
        load_or_create(Path(tmp) / "b")
        for r in range(args.runs):
            for kind in kinds if r % 2 == 0 else kinds[::-1]:
                res = one(kind, args.loop, total, tmp)
                results[kind].append(res)
                print(
                    f"{kind:12} {res[0]:7.0f} MB/s  sender {res[1]:.2f} s/GiB "
                    f"(user {res[3][1]:.2f} sys {res[3][2]:.2f})  receiver {res[2]:.2f} s/GiB "
                    f"(user {res[4][1]:.2f} sys {res[4][2]:.2f})",
                    flush=True,
                )
    print(f"medians, {args.loop}, {args.mib} MiB, {args.runs} runs")
    for kind, rs in results.items():
        print(
            f"{kind:12} {statistics.median(r[0] for r in rs):7.0f} MB/s  "
            f"sender {statistics.median(r[1] for r in rs):.2f} s/GiB  "
            f"receiver {statistics.median(r[2] for r in rs):.2f} s/GiB"
        )


if __name__ == "__main__":
    main()
