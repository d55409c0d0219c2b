"""When the connecting side answers a stream's open (splice.connect_splice), over a real
session pair and a real TCP target, on both loops.

An opener that sent data behind its request does not wait for the answer, so ACCEPT rides
with the target's first bytes (one frame, not two); an opener that sent only its request (a
SOCKS client waiting for its reply) gets ACCEPT at once, before the target says anything.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from tests.test_session import session_pair
from tete_tunnel import preamble
from tete_tunnel.session import Stream
from tete_tunnel.splice import Splice, connect_splice

ACCEPT = preamble.encode(preamble.Accept())
Run = Callable[[Coroutine[Any, Any, Any]], Any]  # the `run` fixture: either loop


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
            splice = await _answer(await sb.accept(), port)
            # Stream.read hands over one frame's payload at a time: one frame, both parts.
            first = await asyncio.wait_for(s.read(), 5)
            assert first == ACCEPT + b"world"
            assert got == [b"hello"]
            s.write_eof()
            assert await asyncio.wait_for(s.read(), 5) == b""  # the target's EOF, as FIN
            assert splice.transport is not None
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
