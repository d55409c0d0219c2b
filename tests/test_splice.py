"""When the connecting side answers a stream's open (splice.connect_splice), over a real
session pair and a real TCP target, on both loops.

An opener that sent data behind its request does not wait for the answer, so ACCEPT rides
with the target's first bytes (one frame, not two); an opener that sent only its request (a
SOCKS client waiting for its reply) gets ACCEPT at once, before the target says anything.
"""

from __future__ import annotations

import asyncio
import gc
import socket

from tests.conftest import Run
from tests.test_session import session_pair
from tests.test_supervisor import Network, PairConnector, _echo_target_and_its_forward, _through
from tete_tunnel import preamble
from tete_tunnel.forward import Forwarder
from tete_tunnel.policy import Policy
from tete_tunnel.session import Stream
from tete_tunnel.splice import Splice, connect_splice
from tete_tunnel.supervisor import supervise

ACCEPT = preamble.encode(preamble.Accept())


async def _target(reply_after: bytes) -> tuple[asyncio.Server, int, list[bytes]]:
    """A TCP target that says `b"world"` once it has received `reply_after` (never, if
    empty), and records what it got."""
    got: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = b""
        while reply_after and len(data) < len(reply_after):
            chunk = await reader.read(100)
            if not chunk:
                break
            data += chunk
        got.append(data)
        if reply_after:
            writer.write(b"world")
            await writer.drain()
        await reader.read()  # until the client ends
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], got


async def _answer(opened: Stream, port: int) -> Splice:
    """What forward does with a CONNECT: take the request, leave what follows unread,
    connect to the target and splice."""
    head = await opened.read()
    found = preamble.parse(head)
    assert found is not None and isinstance(found[0], preamble.Connect), head
    opened.detach(head[found[1] :])
    return await connect_splice(
        opened,
        "127.0.0.1",
        port,
        [(socket.AF_INET, ("127.0.0.1", port))],
        answer=ACCEPT,
        per_address=5,
        on_end=lambda splice, error: None,
    )


def test_answer_rides_with_the_targets_first_bytes(run: Run) -> None:
    async def main() -> None:
        server, port, got = await _target(reply_after=b"hello")
        async with server, session_pair() as (sa, sb):
            s = sa.open_stream()
            s.write(preamble.encode(preamble.Connect("127.0.0.1", port)) + b"hello")
            await _answer(await sb.accept(), port)
            # Stream.read hands over one frame's payload at a time: one frame, both parts.
            first = await asyncio.wait_for(s.read(), 5)
            assert first == ACCEPT + b"world"
            assert got == [b"hello"]
            s.write_eof()
            assert await asyncio.wait_for(s.read(), 5) == b""  # the target's EOF, as FIN
            await asyncio.wait_for(s.wait_closed(), 5)

    run(main())


def test_answer_at_once_for_an_opener_that_waits_for_it(run: Run) -> None:
    async def main() -> None:
        server, port, got = await _target(reply_after=b"")  # says nothing before the client
        async with server, session_pair() as (sa, sb):
            s = sa.open_stream()
            s.write(preamble.encode(preamble.Connect("127.0.0.1", port)))
            await _answer(await sb.accept(), port)
            assert await asyncio.wait_for(s.read(), 5) == ACCEPT
            s.write_eof()
            assert await asyncio.wait_for(s.read(), 5) == b""
            assert got == [b""]

    run(main())


def test_answer_goes_before_the_eof_of_a_silent_target(run: Run) -> None:
    """The opener spoke first, the target closes without a word: ACCEPT, then FIN."""

    async def main() -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readexactly(5)
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, session_pair() as (sa, sb):
            s = sa.open_stream()
            s.write(preamble.encode(preamble.Connect("127.0.0.1", port)) + b"hello")
            await _answer(await sb.accept(), port)
            assert await asyncio.wait_for(s.read(), 5) == ACCEPT
            assert await asyncio.wait_for(s.read(), 5) == b""

    run(main())


def test_a_finished_connection_leaves_nothing_to_the_garbage_collector(run: Run) -> None:
    """Through a real forward pair (-L on one side, the connecting side on the other):
    once connections have ended, no Splice is alive. Each one's objects point back at it
    (transport, stream, callbacks); unless it lets go at its end, only the cyclic garbage
    collector frees them, which is disabled here so that such cycles stay visible."""

    def splices() -> int:
        return sum(isinstance(o, Splice) for o in gc.get_objects())

    async def main() -> tuple[list[bytes], int]:
        net = Network()
        target, client_app = await _echo_target_and_its_forward()
        server_app = Forwarder(local=[], remote=[], policy=Policy())
        stops = asyncio.Event(), asyncio.Event()
        sides = [
            asyncio.ensure_future(
                supervise(PairConnector(net, name), app, timeout=10, keepalive=None, stop=stop)
            )
            for name, app, stop in (("a", client_app, stops[0]), ("b", server_app, stops[1]))
        ]
        try:
            await net.new_round.wait()
            got = [await _through(client_app, b"x" * n) for n in (1, 1000, 100_000)]
            got += await asyncio.gather(*(_through(client_app, b"y%d" % i) for i in range(20)))
            left = splices()
            for _ in range(100):  # the connecting side ends its splices a moment later
                if not left:
                    break
                await asyncio.sleep(0.05)
                left = splices()
            return got, left
        finally:
            stops[0].set()
            await asyncio.gather(*sides, return_exceptions=True)
            target.close()

    gc.collect()
    gc.disable()
    try:
        got, left = run(main())
    finally:
        gc.enable()
    assert got == [b"x", b"x" * 1000, b"x" * 100_000] + [b"y%d" % i for i in range(20)]
    assert left == 0, f"{left} Splice objects outlived their connections"
