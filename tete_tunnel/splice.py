"""Copy bytes both ways between a TCP connection and a mux stream, with half-close.

EOF on one side becomes FIN on the other (and back); a reset becomes a reset. The opener of
a stream first reads the peer's answer: a refusal resets the TCP connection at once, so a
client is never left hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

from tete_tunnel import preamble
from tete_tunnel.errors import TeteError
from tete_tunnel.session import PeerLeft, Stream

CHUNK = 256 * 1024


class Refused(TeteError):
    """The peer refused to open what we asked for; the reason is its own words."""


def reset_tcp(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), as a refused or reset connection should look."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def splice(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    stream: Stream,
    *,
    answer_pending: bool,
) -> None:
    """Run until both directions have ended; raises Refused, StreamReset or LinkLost."""

    async def up() -> None:  # TCP -> stream
        while data := await reader.read(CHUNK):
            stream.write(data)
            await stream.drain()
        stream.write_eof()

    async def down() -> None:  # stream -> TCP
        if answer_pending:
            answer = await preamble.read_message(stream)
            if isinstance(answer, preamble.Refuse):
                raise Refused(answer.reason)
            if not isinstance(answer, preamble.Accept):
                raise preamble.PreambleError(f"unexpected answer {answer!r}")
        while data := await stream.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(up())
            tg.create_task(down())
    except BaseExceptionGroup as group:
        # Whichever side broke, the other learns at once: a reset each way.
        error = group.exceptions[0]
        stream.reset()
        reset_tcp(writer)
        if isinstance(error, TeteError | PeerLeft):  # Refused, StreamReset, LinkLost, ...
            raise error from None
        if isinstance(error, OSError):
            raise TeteError(f"connection reset: {error.strerror or error}") from None
        raise
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()
