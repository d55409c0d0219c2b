#!/usr/bin/env python3
"""Session throughput: one stream and 100 streams, over a socketpair and over loopback TLS.

Not a test: it prints figures so changes to the I/O path can be compared. Run from the
repository root:  python benchmarks/session_throughput.py [--mib 512] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tete_tunnel.carrier import Carrier, plain_carrier
from tete_tunnel.identity import load_or_create
from tete_tunnel.secure import Auth, secure
from tete_tunnel.session import Session, Stream

CHUNK = 1 << 20


async def socketpair_links() -> tuple[Carrier, Carrier, bool]:
    a, b = socket.socketpair()
    return await plain_carrier(a), await plain_carrier(b), True


async def tls_links(tmp: Path) -> tuple[Carrier, Carrier, bool]:
    """Two authenticated TLS links over loopback TCP, as the tool makes them."""
    ida, idb = load_or_create(tmp / "a"), load_or_create(tmp / "b")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    loop = asyncio.get_running_loop()
    client = socket.socket()
    client.setblocking(False)
    connecting = loop.sock_connect(client, listener.getsockname())
    (server, _), _ = await asyncio.gather(loop.sock_accept(listener), connecting)
    listener.close()
    for s in (client, server):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    la, lb = await asyncio.gather(secure(client, ida, Auth()), secure(server, idb, Auth()))
    return la.carrier, lb.carrier, la.is_tls_client


async def transfer(links: tuple, total: int, streams: int) -> float:
    ca, cb, a_is_client = links
    payload = os.urandom(CHUNK)
    per_stream = total // streams
    async with (
        Session(ca, client=a_is_client) as sa,
        Session(cb, client=not a_is_client) as sb,
    ):

        async def send(s: Stream) -> None:
            for _ in range(per_stream // CHUNK):
                s.write(payload)
                await s.drain()
            s.write_eof()

        async def receive() -> int:
            t = await sb.accept()
            n = 0
            while chunk := await t.read():
                n += len(chunk)
            return n

        started = time.perf_counter()
        receivers = [asyncio.create_task(receive()) for _ in range(streams)]
        senders = [asyncio.create_task(send(sa.open_stream())) for _ in range(streams)]
        await asyncio.gather(*senders)
        received = sum(await asyncio.gather(*receivers))
        elapsed = time.perf_counter() - started
        assert received == per_stream // CHUNK * CHUNK * streams
        return received / elapsed


async def one(path: str, streams: int, total: int, tmp: Path) -> float:
    links = await (socketpair_links() if path == "socketpair" else tls_links(tmp))
    return await transfer(links, total, streams)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=512, help="MiB per measurement")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    total = args.mib << 20
    print(f"session throughput, {args.mib} MiB per run, median of {args.runs} runs")
    print(f"{'path':<14}{'streams':>8}{'MB/s':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("socketpair", "loopback TLS"):
            for streams in (1, 100):
                rates = []
                for _ in range(args.runs):
                    rates.append(asyncio.run(one(name, streams, total, Path(tmp))))
                print(f"{name:<14}{streams:>8}{statistics.median(rates) / 1e6:>10.0f}")


if __name__ == "__main__":
    main()
