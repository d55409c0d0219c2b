"""Pump bytes both ways between a TCP connection and a mux stream, with half-close.

A protocol, not a pair of copy loops: TCP data goes into the stream as it arrives (reading
pauses while the stream's queue is full), stream data goes into the TCP transport as it
arrives (window credit is held back while that transport's buffer is full, which slows the
peer's sender). EOF on one side becomes FIN on the other and back; a reset becomes a reset.
The opener of a stream first reads the peer's answer: a refusal resets the TCP connection at
once, so a client is never left hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

from tete_tunnel import preamble
from tete_tunnel.errors import TeteError
from tete_tunnel.session import STREAM_HIGH_WATER, PeerLeft, Stream

TCP_HIGH_WATER = 256 * 1024


class Refused(TeteError):
    """The peer refused to open what we asked for; the reason is its own words."""


def _linger_zero(sock: socket.socket) -> None:
    """Make the next close send RST, as a refused or reset connection should look."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def reset_socket(sock: socket.socket) -> None:
    _linger_zero(sock)
    sock.close()


class _Splice(asyncio.Protocol):
    def __init__(self, stream: Stream, answer_pending: bool, done: asyncio.Future[None]) -> None:
        self.stream = stream
        self.answer: bytearray | None = bytearray() if answer_pending else None
        self.done = done
        self.transport: asyncio.Transport | None = None
        self.up_done = False  # TCP EOF passed on as FIN
        self.down_done = False  # stream FIN passed on as TCP EOF
        self.reading_paused = False
        self.writing_paused = False
        self.owed = 0  # credit held back while the TCP transport is full

    # -- TCP side -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=TCP_HIGH_WATER)
        self.stream.on_drained = self._stream_drained
        self.stream.attach(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.stream.write(data)
        except (TeteError, PeerLeft) as exc:
            self.fail(exc)
            return
        if self.stream.write_buffered > STREAM_HIGH_WATER and not self.reading_paused:
            self.reading_paused = True
            assert self.transport is not None
            self.transport.pause_reading()

    def _stream_drained(self) -> None:
        if self.reading_paused and self.transport is not None and not self.transport.is_closing():
            self.reading_paused = False
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        self.stream.write_eof()
        self.up_done = True
        self._check_done()
        return True  # keep our write side open: half-close

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            if exc is None and self.up_done and self.down_done:
                self.done.set_result(None)
            else:
                reason = f"connection reset: {exc}" if exc else "connection closed early"
                self.fail(TeteError(reason))

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.owed:
            self.stream.credit(self.owed)
            self.owed = 0

    # -- stream side --------------------------------------------------------------------

    def stream_data(self, data: bytes) -> None:
        if self.answer is not None:
            data = self._take_answer(data)
            if not data:
                return
        assert self.transport is not None
        if self.transport.is_closing():
            self.stream.credit(len(data))
            return
        self.transport.write(data)
        if self.writing_paused:
            self.owed += len(data)
        else:
            self.stream.credit(len(data))

    def _take_answer(self, data: bytes) -> bytes:
        """Collect the peer's answer; return the data behind it once it is complete."""
        assert self.answer is not None
        self.answer += data
        if len(self.answer) < 2:
            return b""
        (length,) = struct.unpack("!H", self.answer[:2])
        if not 0 < length <= preamble.MAX_LENGTH:
            self.fail(preamble.PreambleError(f"answer of {length} bytes"))
            return b""
        if len(self.answer) < 2 + length:
            return b""
        try:
            answer = preamble.decode(bytes(self.answer[2 : 2 + length]))
        except preamble.PreambleError as exc:
            self.fail(exc)
            return b""
        rest = bytes(self.answer[2 + length :])
        self.answer = None
        self.stream.credit(2 + length)  # the rest is credited as it is passed on
        if isinstance(answer, preamble.Refuse):
            self.fail(Refused(answer.reason))
            return b""
        if not isinstance(answer, preamble.Accept):
            self.fail(preamble.PreambleError(f"unexpected answer {answer!r}"))
            return b""
        return rest

    def stream_eof(self) -> None:
        if self.answer is not None:
            self.fail(preamble.PreambleError("the stream ended before the peer's answer"))
            return
        assert self.transport is not None
        if self.transport.can_write_eof() and not self.transport.is_closing():
            self.transport.write_eof()
        self.down_done = True
        self._check_done()

    def stream_error(self, error: BaseException) -> None:
        self.fail(error)

    # -- ending -------------------------------------------------------------------------

    def _check_done(self) -> None:
        if self.up_done and self.down_done and self.transport is not None:
            self.transport.close()  # connection_lost completes `done`

    def fail(self, error: BaseException) -> None:
        """Whichever side broke, the other learns at once: a reset each way."""
        if not self.done.done():
            self.done.set_exception(error)
        self.abort()

    def abort(self) -> None:
        self.stream.reset()
        if self.transport is not None and not self.transport.is_closing():
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                _linger_zero(sock)
            self.transport.abort()


async def splice(sock: socket.socket, stream: Stream, *, answer_pending: bool) -> None:
    """Run until both directions have ended; raises Refused, StreamReset, LinkLost, ..."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    sock.setblocking(False)
    try:
        _, protocol = await loop.connect_accepted_socket(
            lambda: _Splice(stream, answer_pending, done), sock
        )
    except OSError as exc:
        stream.reset()
        sock.close()
        raise TeteError(f"connection lost: {exc.strerror or exc}") from exc
    try:
        await done
    except asyncio.CancelledError:
        done.cancel()
        protocol.abort()
        raise
