"""Pump bytes both ways between a TCP connection and a mux stream, with half-close.

A protocol, not a pair of copy loops: TCP data goes into the stream as it arrives (reading
pauses while the stream's queue is full), stream data goes into the TCP transport as it
arrives (window credit is held back while that transport's buffer is full, which slows the
peer's sender). EOF on one side becomes FIN on the other and back; a reset becomes a reset.
The opener of a stream first reads the peer's answer: a refusal resets the TCP connection at
once, so a client is never left hanging.

Every callback here runs inside a transport's or the session's dispatch; none may raise. A
failure of one connection (a client that reset, a socket already shut) ends that connection
and its stream, with `on_end(splice, error)` called once, and nothing else.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable

from tete_tunnel import preamble
from tete_tunnel.errors import Closed, LinkBroken, TeteError
from tete_tunnel.net import endpoint
from tete_tunnel.session import Stream, linger_zero

TCP_HIGH_WATER = 256 * 1024


class Refused(TeteError):
    """The peer refused to open what we asked for; the reason is its own words."""


class OpenFailed(TeteError):
    """No stream could be opened for a new connection (e.g. the session is ending)."""


class ConnectionEnded(TeteError):
    """The TCP side of a splice reset or closed before both directions were done."""


class Splice(asyncio.Protocol):
    """One TCP connection spliced to one stream; `on_end(self, error)` is called once.

    The TCP side is paused from `connection_made` until `start(stream)` gives it a stream,
    so a listener may accept a connection before it has a link to carry it.
    """

    def __init__(
        self,
        *,
        on_made: Callable[[Splice], None],
        on_end: Callable[[Splice, BaseException | None], None],
        answer_pending: bool,
    ) -> None:
        self._on_made = on_made
        self.on_end = on_end
        self.stream: Stream | None = None
        self.answer: bytes | None = b"" if answer_pending else None  # what came of it so far
        self.ended = False
        self.transport: asyncio.Transport | None = None
        self.up_done = False  # TCP EOF passed on as FIN
        self.down_done = False  # stream FIN passed on as TCP EOF
        self.reading_paused = False
        self.writing_paused = False
        self.owed = 0  # credit held back while the TCP transport is full
        # What a loop delivers before start() despite pause_reading (uvloop may read once).
        self._early: list[bytes] = []
        self._early_eof = False
        self._held = b""  # our answer, to go out with the first data or EOF (hold_answer)

    @property
    def client(self) -> str:
        """Who is on the TCP side, for log lines."""
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return endpoint(*peer[:2]) if peer else "a client"

    # -- TCP side -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not subclasses
        self.transport.set_write_buffer_limits(high=TCP_HIGH_WATER)
        try:
            self._on_made(self)  # usually start()s at once: no pause and resume then
        except Exception as exc:
            self.fail(OpenFailed(str(exc) or "no stream for the connection"))
            return
        if self.stream is None and not self.ended:
            self.transport.pause_reading()  # until start() gives us a stream
            self.reading_paused = True

    def start(self, stream: Stream) -> None:
        """Splice the connection to `stream` (its request, if any, is already written)."""
        if self.ended:
            stream.reset()
            return
        self.stream = stream
        stream.on_drained = self._stream_drained
        try:
            stream.attach(self)
            early, self._early = self._early, []
            for data in early:
                self.data_received(data)
            if self._early_eof:
                self.eof_received()
            self._stream_drained()
        except Exception as exc:
            self.fail(exc)

    def data_received(self, data: bytes) -> None:
        stream = self.stream
        if stream is None:
            if not self.ended:
                self._early.append(data)  # at most one read: reading is paused
                if self.transport is not None:
                    self.transport.pause_reading()
            return
        if self.ended:
            return
        if self._held:
            data, self._held = self._held + data, b""
        try:
            stream.write(data)
        except Exception as exc:
            self.fail(exc)
            return
        if stream.write_blocked and not self.reading_paused:
            self.reading_paused = True
            assert self.transport is not None
            self.transport.pause_reading()

    def _stream_drained(self) -> None:
        transport = self.transport
        if (
            self.reading_paused
            and transport is not None
            and not transport.is_closing()
            and self.stream is not None
            and not self.stream.write_blocked
        ):
            self.reading_paused = False
            transport.resume_reading()

    def eof_received(self) -> bool:
        if self.stream is None:
            self._early_eof = True
            return True
        if not self.ended:
            if self._held:
                self.stream.write(self._held)
                self._held = b""
            self.stream.write_eof()
            self.up_done = True
            self._check_done()
        return True  # keep our write side open: half-close

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            if not self.ended:
                if exc is None and self.up_done and self.down_done:
                    self.ended = True
                    self.on_end(self, None)
                else:
                    reason = f"connection reset: {exc}" if exc else "connection closed early"
                    self.fail(ConnectionEnded(reason))
        finally:
            self._unlink()

    def _unlink(self) -> None:
        """The connection is over: let go of what points back at us. The transport holds
        us as its protocol, the stream as its consumer, our callbacks hold the stream:
        cycles of about a dozen objects a connection, which only the cyclic garbage
        collector would free, in its own time."""
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.on_drained = None
            stream.detach()
        self.transport = None
        self._on_made = self.on_end = _ignore_end  # type: ignore[assignment]

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.owed and self.stream is not None:
            self.stream.credit(self.owed)
            self.owed = 0

    # -- stream side (called from the session's dispatch) --------------------------------

    def hold_answer(self, answer: bytes) -> None:
        """Send `answer` with the TCP side's first data (or its EOF), not on its own: for an
        opener that did not wait for it (it sent data behind its request), an answer alone
        costs a TLS record and a wake-up of the peer per connection, for nothing."""
        self._held = answer

    def stream_data(self, data: bytes) -> None:
        stream, transport = self.stream, self.transport
        assert stream is not None and transport is not None
        taken = len(data)  # credited once passed on, with the answer in front of it
        if self.answer is not None:
            taken += len(self.answer)  # the parts of it that came before
            data = self._take_answer(data)
            if self.answer is not None or self.ended:
                return  # not complete yet, or refused: the stream is reset
        if self.ended or transport.is_closing() or not data:
            stream.credit(taken)
            return
        transport.write(data)
        if self.writing_paused:
            self.owed += taken
        else:
            stream.credit(taken)

    def _take_answer(self, data: bytes) -> bytes:
        """Collect the peer's answer; return the data behind it once it is complete."""
        assert self.answer is not None and self.stream is not None
        head = self.answer + data if self.answer else data  # usually whole in one piece
        try:
            found = preamble.parse(head)
        except preamble.PreambleError as exc:
            self.fail(preamble.PreambleError(f"bad answer: {exc}"))
            return b""
        if found is None:
            self.answer = head
            return b""
        answer, used = found
        self.answer = None
        if isinstance(answer, preamble.Refuse):
            self.fail(Refused(answer.reason))
            return b""
        if not isinstance(answer, preamble.Accept):
            self.fail(preamble.PreambleError(f"unexpected answer {answer!r}"))
            return b""
        self.accepted()
        return head[used:]

    def accepted(self) -> None:
        """The peer answered ACCEPT; its data follows (a SOCKS client's reply goes first)."""

    def stream_eof(self) -> None:
        if self.ended:
            return
        if self.answer is not None:
            self.fail(preamble.PreambleError("the stream ended before the peer's answer"))
            return
        transport = self.transport
        assert transport is not None
        if transport.can_write_eof() and not transport.is_closing():
            try:
                transport.write_eof()
            except OSError as exc:  # the client is gone (ENOTCONN after its reset)
                self.fail(ConnectionEnded(f"cannot pass on the end of data: {exc.strerror}"))
                return
        self.down_done = True
        self._check_done()

    def stream_error(self, error: BaseException) -> None:
        self.fail(error)

    # -- ending -------------------------------------------------------------------------

    def _check_done(self) -> None:
        if self.up_done and self.down_done and self.transport is not None:
            self.transport.close()  # connection_lost reports the end

    def fail(self, error: BaseException) -> None:
        """Whichever side broke, the other learns at once: a reset each way."""
        if not self.ended:
            self.ended = True
            try:
                self.on_end(self, error)
            finally:
                self.abort()
        else:
            self.abort()

    def abort(self) -> None:
        """Reset both sides; the owner has given up on this connection: no on_end after."""
        self.ended = True
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.on_drained = None
            stream.reset()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            sock = transport.get_extra_info("socket")
            if sock is not None:
                linger_zero(sock)
            transport.abort()


def _ignore_end(*args: object) -> None:
    """What a splice calls once unlinked (never, as it has ended): not its owner."""


def session_ended(error: BaseException | None) -> bool:
    """The connection ended because its session did (that end is reported once, elsewhere)."""
    return isinstance(error, (Closed, LinkBroken))


class ConnectFailed(TeteError):
    """No address of the target answered; nothing was written to the stream."""


async def connect_splice(
    stream: Stream,
    host: str,
    port: int,
    addresses: list[tuple],
    *,
    answer: bytes,
    per_address: float,
    on_end: Callable[[Splice, BaseException | None], None],
) -> Splice:
    """Connect to the first address that answers, then `answer` the stream and splice.

    Returns once connected: the splice then lives on callbacks, and `on_end` reports its
    end (no task waits for it). Raises ConnectFailed, with nothing written to the stream.
    The connection is made by the loop (one call: no per-socket set-up of our own).
    """
    loop = asyncio.get_running_loop()

    def made(splice: Splice) -> None:
        if stream.unread:  # the opener sent data behind its request: it is not waiting
            splice.hold_answer(answer)
        else:
            stream.write(answer)  # before any data of the target's
        splice.start(stream)

    protocol = Splice(on_made=made, on_end=on_end, answer_pending=False)
    last: OSError | None = None
    for family, address in addresses:
        try:
            async with asyncio.timeout(per_address):
                await loop.create_connection(lambda: protocol, *address[:2], family=family)
            return protocol
        except TimeoutError:
            last = OSError(errno.ETIMEDOUT, "timed out")
        except OSError as exc:
            last = exc
    # asyncio words failures as "Connect call failed (...)": say what errno means.
    reason = os.strerror(last.errno) if last is not None and last.errno else str(last)
    raise ConnectFailed(f"cannot connect to {endpoint(host, port)}: {reason}")
