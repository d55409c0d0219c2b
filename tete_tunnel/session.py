"""The asyncio driver of the mux core: the link's protocol, a timer, and Stream objects.

The session becomes the link transport's protocol: a BufferedProtocol that has TLS decrypt
into one reused buffer, which the core parses in place. Writes are flushed from callbacks,
once per loop turn, in large batches (the core puts control frames first and takes turns
across streams), and stop while the transport's buffer is full. Received data goes to the
stream's buffer, bounded by the window we granted, or straight to a consumer (splice), so
no stream can hold up the others.

Two rules hold the session together:
- Only the link ends a session: a TLS/TCP error, a protocol violation, an unanswered
  keepalive, or the orderly exchange of go-aways. Anything raised while handling one stream
  (its consumer, its TCP connection) resets that stream, logs one line, and the session goes
  on (`_contain`).
- How it ended is decided in one place, `_finish`: `error` is None for an orderly close, or
  a `LinkBroken` subclass that names the cause.

An orderly close is an exchange: each side sends go-away when it is done with the session
(for `pipe`: when it has delivered everything it received), and the link is closed once both
have. A peer's go-away is therefore also its receipt.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import mmap
import socket
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

from tete_tunnel.carrier import Carrier
from tete_tunnel.errors import (
    Closed,
    LinkBroken,
    LocalFailure,
    PeerAborted,
    PeerDeclined,
    PeerUnresponsive,
    PeerViolation,
    StreamReset,
    TeteError,
)
from tete_tunnel.malloc import release_free_memory
from tete_tunnel.mux import events as ev
from tete_tunnel.mux.connection import Config, Connection
from tete_tunnel.mux.errors import GoAwayCode, LocalProtocolError

log = logging.getLogger("tete_tunnel")

# Once RELEASE_AFTER bytes have moved since the last time, RELEASE_IDLE seconds without
# traffic hand free heap memory back to the kernel (malloc.release_free_memory).
RELEASE_AFTER = 8 << 20
RELEASE_IDLE = 5.0
READ_BUFFER = 1024 * 1024  # one TLS read lands here, and is parsed in place
WRITE_BATCH = 512 * 1024  # bytes per transport write: large frames, full TLS records
TRANSPORT_HIGH_WATER = 512 * 1024  # the link transport's buffer before we stop writing
STREAM_HIGH_WATER = 256 * 1024  # a stream writer's drain() waits while more is queued
# Bytes written by the application and not yet sent, all streams together. Past it, a
# stream may hold only STREAM_HIGH_WATER_TIGHT: streams whose data the peer does not take
# (a hostile or stuck peer) cannot pile up memory, while streams that drain keep moving.
SEND_BUDGET = 64 * 1024 * 1024
STREAM_HIGH_WATER_TIGHT = 64 * 1024
LINGER = 2.0  # after our go-away, how long close() waits for the peer's by default
ABUSE_REPORT_INTERVAL = 5.0  # refused opens are logged as one line per interval at most


@dataclass(frozen=True)
class Keepalive:
    """Application pings: one every `interval` s; no pong for `timeout` s means dead."""

    interval: float = 15.0
    timeout: float = 45.0


def mux_config(keepalive: Keepalive | None) -> Config:
    if keepalive is None:
        return Config()
    return Config(keepalive_interval=keepalive.interval, keepalive_timeout=keepalive.timeout)


class Consumer(Protocol):
    """Takes a stream's incoming data as it arrives (instead of read())."""

    def stream_data(self, data: bytes) -> None: ...
    def stream_eof(self) -> None: ...
    def stream_error(self, error: BaseException) -> None: ...


class Stream:
    """One mux stream with the shape of asyncio's StreamReader/StreamWriter pair.

    Its events are made when someone first waits on them: most streams of a forward are
    served by callbacks and never wait, and a short connection should not pay for three.
    """

    __slots__ = (
        "_buffer",
        "_buffered",
        "_closed",
        "_consumer",
        "_discard",
        "_drained",
        "_eof",
        "_eof_sent",
        "_error",
        "_is_closed",
        "_readable",
        "_session",
        "id",
        "on_drained",
    )

    def __init__(self, session: Session, stream_id: int) -> None:
        self._session = session
        self.id = stream_id
        self._buffer: deque[bytes] = deque()
        self._buffered = 0
        self._eof = False  # the peer's FIN arrived
        self._eof_sent = False
        self._error: BaseException | None = None
        self._readable: asyncio.Event | None = None  # made by the first wait
        self._drained: asyncio.Event | None = None
        self._closed: asyncio.Event | None = None
        self._is_closed = False
        self._discard = False
        self._consumer: Consumer | None = None
        self.on_drained: Callable[[], None] | None = None  # called when writes may go on

    # -- reading ----------------------------------------------------------------------

    async def read(self, n: int = -1) -> bytes:
        """Up to n bytes (all buffered if n < 0); b"" once the peer has ended its side."""
        while not self._buffer:
            if self._eof:  # data and FIN that arrived before a session end still count
                return b""
            if self._error is not None:
                raise self._error
            if self._readable is None:
                self._readable = asyncio.Event()
            self._readable.clear()
            await self._readable.wait()
        if n < 0 or n >= len(self._buffer[0]):
            data = self._buffer.popleft()
        else:
            head = self._buffer[0]
            data, self._buffer[0] = head[:n], head[n:]
        self._buffered -= len(data)
        self.credit(len(data))
        return data

    async def readexactly(self, n: int) -> bytes:
        parts = []
        while n:
            chunk = await self.read(n)
            if not chunk:
                raise asyncio.IncompleteReadError(b"".join(parts), n)
            parts.append(chunk)
            n -= len(chunk)
        return b"".join(parts)

    def at_eof(self) -> bool:
        return self._eof and not self._buffer

    @property
    def unread(self) -> int:
        """Bytes received and not yet read or handed to a consumer."""
        return self._buffered

    @property
    def peer_ended(self) -> bool:
        """The peer's FIN arrived: its data is complete (whatever is still buffered)."""
        return self._eof

    def attach(self, consumer: Consumer) -> None:
        """From now on, incoming data goes to `consumer`; it grants credit with credit()."""
        self._consumer = consumer
        while self._buffer and self._consumer is consumer:  # it may detach() on the way
            data = self._buffer.popleft()
            self._buffered -= len(data)
            consumer.stream_data(data)
        if self._consumer is not consumer:
            return
        if self._eof:
            consumer.stream_eof()
        elif self._error is not None:
            consumer.stream_error(self._error)

    def detach(self, unused: bytes = b"") -> None:
        """Stop handing data to the consumer; `unused` (data it was given and did not use)
        is read first, by read() or by the next consumer."""
        self._consumer = None
        if unused:
            self._buffer.appendleft(unused)
            self._buffered += len(unused)

    def credit(self, n: int) -> None:
        """The application has taken n bytes: the peer may send that much more."""
        self._session._consumed(self.id, n)

    # -- writing ----------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        if type(data) is not bytes:
            data = bytes(data)  # queued, and then written, by reference: the caller may reuse it
        self._session._send(self.id, data)

    @property
    def write_buffered(self) -> int:
        return self._session.conn.send_buffered(self.id)

    @property
    def write_blocked(self) -> bool:
        """More is queued than this stream may hold now: stop writing until on_drained.
        Asking is what registers the stream for that call (streams never blocked, the
        short connections, cost the flush nothing)."""
        if self.write_buffered <= self._session._stream_high_water():
            return False
        self._session._dirty.add(self.id)
        return True

    async def drain(self) -> None:
        while self.write_blocked:
            if self._error is not None:
                raise self._error
            if self._drained is None:
                self._drained = asyncio.Event()
            self._drained.clear()
            await self._drained.wait()
        if self._error is not None:
            raise self._error

    def write_eof(self) -> None:
        if not self._eof_sent and self._error is None:
            self._eof_sent = True
            self._session._end(self.id)

    def can_write_eof(self) -> bool:
        return True

    def reset(self) -> None:
        """Abort both directions at once (the peer sees a reset)."""
        if self._error is None:
            self._session._reset(self.id)
            self._fail(StreamReset(f"stream {self.id} reset by us"), notify=False)

    def close(self) -> None:
        """End our side; whatever the peer still sends is read and dropped."""
        self.write_eof()
        self._buffer.clear()
        self._discard = True

    async def wait_closed(self) -> None:
        """Until both directions have ended (or the stream was reset)."""
        if self._is_closed:
            return
        if self._closed is None:
            self._closed = asyncio.Event()
        await self._closed.wait()

    def is_closing(self) -> bool:
        return self._eof_sent or self._error is not None

    @property
    def error(self) -> BaseException | None:
        """Why the stream ended early (reset, or the session ended), if it did."""
        return self._error

    # -- called by the session ----------------------------------------------------------

    def _set_closed(self) -> None:
        self._is_closed = True
        if self._closed is not None:
            self._closed.set()

    def _data(self, data: bytes) -> None:
        self._session.bytes_received += len(data)
        if self._discard:
            self.credit(len(data))
        elif self._consumer is not None:
            self._consumer.stream_data(data)
        else:
            self._buffer.append(data)
            self._buffered += len(data)
            if self._readable is not None:
                self._readable.set()

    def _ended(self) -> None:
        self._eof = True
        if self._readable is not None:
            self._readable.set()
        if self._consumer is not None:
            self._consumer.stream_eof()

    def _writable(self) -> None:
        if self._drained is not None:
            self._drained.set()
        if self.on_drained is not None:
            self.on_drained()

    def _fail(self, error: BaseException, notify: bool = True) -> None:
        first = self._error is None
        if first:
            self._error = error
        if self._readable is not None:
            self._readable.set()
        if self._drained is not None:
            self._drained.set()
        self._set_closed()
        if first and notify and self._consumer is not None and not self._eof:
            self._consumer.stream_error(error)


class _LinkProtocol(asyncio.BufferedProtocol):
    """The session's face to the transport: reads land in one reused buffer."""

    def __init__(self, session: Session) -> None:
        self._session = session
        # Anonymous memory, not a bytearray (which is zero-filled, so all resident at once):
        # a page costs memory only once a read has reached it.
        self._buffer = memoryview(mmap.mmap(-1, READ_BUFFER))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self._session._on_data(self._buffer[:nbytes])

    def eof_received(self) -> bool:
        self._session._on_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._session._transport_lost = True
        self._session._on_lost(exc)

    def pause_writing(self) -> None:
        self._session._writing_paused = True

    def resume_writing(self) -> None:
        self._session._writing_paused = False
        self._session._schedule_flush()


def link_error(exc: BaseException | None) -> LinkBroken:
    """Name the cause of a transport's end that came without an orderly close."""
    if exc is None:
        return PeerAborted("it closed without saying goodbye")
    if isinstance(exc, OSError) and exc.errno == errno.ETIMEDOUT:
        return PeerUnresponsive("TCP gave up: the peer acknowledged nothing in time")
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return PeerAborted(f"the connection was reset ({exc.strerror or exc})")
    if isinstance(exc, OSError) and exc.strerror:
        return LocalFailure(f"[Errno {exc.errno}] {exc.strerror}")
    return LocalFailure(str(exc) or type(exc).__name__)


class Session:
    """Owns the link while in use (`async with`), the timer that keeps it alive, and how
    it ended (`error`: None while up or after an orderly close)."""

    def __init__(self, carrier: Carrier, *, client: bool, config: Config | None = None) -> None:
        self.conn = Connection(client=client, config=config or Config())
        self._carrier = carrier
        assert carrier.transport is not None
        self._transport: asyncio.Transport = carrier.transport
        self._loop = asyncio.get_running_loop()
        self._streams: dict[int, Stream] = {}
        self._incoming: deque[Stream] = deque()  # bounded by the core's pending limit
        self._incoming_ready = asyncio.Event()  # set when a stream arrives or the session ends
        self._handler: Callable[[Stream], None] | None = None  # see serve_streams
        self._writing_paused = False
        self._flush_scheduled = False
        self._pending_finish: tuple[LinkBroken | None] | None = None
        self._dirty: set[int] = set()  # streams found blocked, to be told when they drain
        self._timer: asyncio.Task[None] | None = None
        self._reported = (0, 0)  # refused/throttled opens already logged
        self._next_report = 0.0
        self._transport_lost = False  # connection_lost came: nothing left to close
        self._streams_gone = asyncio.Event()  # set when the last open stream goes
        self.ended = asyncio.Event()
        self.peer_closing = asyncio.Event()  # the peer's orderly go-away arrived
        self.peer_moved = False  # ... and said its work went on over a direct link (MOVED)
        self.error: LinkBroken | None = None  # why the session ended, if not in order
        # What went through, for the summary at the end of a command (stream payload,
        # preambles included).
        self.bytes_sent = 0
        self.bytes_received = 0
        self.streams_opened = 0  # by either side
        # For _release_when_idle: bytes moved at the last timer tick, when they last changed,
        # and at the last release.
        self._moved, self._moved_when, self._moved_at_release = 0, 0.0, 0
        self.memory_releases = 0

    # -- lifetime ---------------------------------------------------------------------

    async def __aenter__(self) -> Session:
        self._transport.set_write_buffer_limits(high=TRANSPORT_HIGH_WATER)
        self._transport.set_protocol(_LinkProtocol(self))
        self._timer = asyncio.create_task(self._timer_loop())
        self.conn.ping(self._loop.time())  # a first RTT sample, for window tuning
        self.conn.start_keepalive(self._loop.time())
        carrier = self._carrier
        if carrier.buffer:  # what arrived between READY and now
            self._on_data(memoryview(bytes(carrier.buffer)))
            carrier.buffer.clear()
        if carrier.closed:
            self._on_lost(carrier.error)
        elif carrier.eof:
            self._on_eof()
        self._schedule_flush()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc is None:
                await self.close()
            else:
                self.abort(LocalFailure(f"our side gave up ({exc!r})"))
        finally:
            if self._timer is not None:
                self._timer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._timer

    @property
    def peer_confirmed(self) -> bool:
        """The peer closed in order: it sent go-away, so it is done and took what we sent."""
        return self.peer_closing.is_set()

    async def close(
        self, code: GoAwayCode = GoAwayCode.NORMAL, linger: float | None = LINGER
    ) -> None:
        """Orderly end: go-away behind what is queued, wait for the peer's go-away (at most
        `linger` seconds; None: as long as the link lives), then close the link. NORMAL
        says we are done and took everything we were sent; CANCELLED that we did not.

        Streams still open end with the session (the peer sees them fail, not end cleanly):
        callers that want a stream's data delivered wait for it to close first.
        """
        if self.ended.is_set():
            return
        self.conn.go_away(code)
        if self.peer_closing.is_set():
            self._finish_after_flush(None)
        else:
            self._schedule_flush()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(linger):
                await self.ended.wait()
        self._finish(None)

    def abort(self, error: LinkBroken) -> None:
        """End now, abortively (RST): a link declared dead must not linger half-open."""
        self._finish(error)

    def _finish(self, error: LinkBroken | None) -> None:
        """The one place a session ends: fail the streams, stop the timer, drop the link."""
        if self.ended.is_set():
            return
        self.error = error
        failure: TeteError = error if error is not None else Closed("the session was closed")
        streams = list(self._streams.values())
        self._streams.clear()
        self.ended.set()
        self._incoming_ready.set()
        self._streams_gone.set()
        if self._timer is not None and self._timer is not asyncio.current_task():
            self._timer.cancel()
        self._report_abuse(self._loop.time(), final=True)  # what the last interval refused
        if error is not None:
            log.debug("session ended: %s", error)
        if error is None or isinstance(error, PeerViolation):
            # Our last frames (a GO_AWAY(1) saying why) go out before the FIN: an RST now
            # could destroy them in flight. A peer that will not close is cut off later.
            self._transport.close()
            if error is not None:
                self._loop.call_later(LINGER, self._cut_off)
        else:
            _abort_transport(self._transport)
        for stream in streams:
            self._contain(stream, stream._fail, failure)

    def _cut_off(self) -> None:
        if not self._transport_lost:
            _abort_transport(self._transport)

    async def no_streams(self) -> None:
        """Until no stream is open (or the session has ended)."""
        while self._streams and not self.ended.is_set():
            self._streams_gone.clear()
            await self._streams_gone.wait()

    async def wait_ended(self) -> None:
        """Until the session ends; raises why if it was not orderly."""
        await self.ended.wait()
        if self.error is not None:
            raise self.error

    # -- streams ----------------------------------------------------------------------

    def open_stream(self) -> Stream:
        if self.ended.is_set():
            raise self.error or Closed("the session has ended")
        try:
            stream_id = self.conn.open_stream()
        except LocalProtocolError as exc:
            raise TeteError(str(exc)) from exc
        stream = self._streams[stream_id] = Stream(self, stream_id)
        self.streams_opened += 1
        self._schedule_flush()
        return stream

    async def accept(self, *, ack_now: bool = True) -> Stream:
        """The next stream the peer opened (its ACK goes out now, or with `ack_now=False`
        on our first frame on it: the caller answers every open soon, see preamble).

        Raises Closed once the peer is leaving in order (it opens nothing more) or the
        session has closed, and the LinkBroken error if it broke.
        """
        while not self._incoming:
            if self.ended.is_set():
                raise self.error or Closed("the session has ended")
            if self.peer_closing.is_set():
                raise Closed("the peer closed the session")
            self._incoming_ready.clear()
            await self._incoming_ready.wait()
        stream = self._incoming.popleft()
        self.streams_opened += 1
        if self.conn.terminated is None and self.conn.has_stream(stream.id):
            self.conn.accept_stream(stream.id, ack_now=ack_now)
            if ack_now:
                self._schedule_flush()
        return stream

    def serve_streams(self, handler: Callable[[Stream], None] | None) -> None:
        """Hand every stream the peer opens to `handler`, inside the dispatch of its first
        frame (no task, no loop turn per stream), accepted with its ACK riding on our first
        frame on it: the handler answers every open (or resets it). Streams waiting for
        accept() go first. None: back to accept()."""
        self._handler = handler
        while handler is not None and self._incoming and not self.ended.is_set():
            self._hand_over(self._incoming.popleft(), handler)

    def _hand_over(self, stream: Stream, handler: Callable[[Stream], None]) -> None:
        self.streams_opened += 1
        if self.conn.terminated is None and self.conn.has_stream(stream.id):
            self.conn.accept_stream(stream.id, ack_now=False)
        self._contain(stream, handler, stream)

    async def peer_leaving(self) -> None:
        """Until the peer leaves in order (its go-away) or the session ends; raises the
        LinkBroken error if it broke (as accept() would)."""
        while not (self.ended.is_set() or self.peer_closing.is_set()):
            self._incoming_ready.clear()
            await self._incoming_ready.wait()
        if self.ended.is_set() and self.error is not None:
            raise self.error

    def _stream_high_water(self) -> int:
        if self.conn.queued_bytes > SEND_BUDGET:
            return STREAM_HIGH_WATER_TIGHT
        return STREAM_HIGH_WATER

    def _send(self, stream_id: int, data: bytes | bytearray | memoryview) -> None:
        try:
            self.conn.send(stream_id, data)
        except LocalProtocolError as exc:
            raise TeteError(f"cannot write: {exc}") from exc
        self.bytes_sent += len(data)
        self._schedule_flush()

    def _end(self, stream_id: int) -> None:
        try:  # not contextlib.suppress, which costs three calls more for every stream
            self.conn.end_stream(stream_id)
        except LocalProtocolError:
            pass
        self._schedule_flush()

    def _reset(self, stream_id: int) -> None:
        try:
            self.conn.reset_stream(stream_id)
        except LocalProtocolError:
            pass
        self._schedule_flush()
        self._reap()

    def _consumed(self, stream_id: int, n: int) -> None:
        if n and not self.ended.is_set():
            self.conn.consumed(stream_id, n, self._loop.time())
            if self.conn.has_data_to_send():
                self._schedule_flush()

    def _reap(self) -> None:
        """Drop the Stream objects whose state the core has forgotten."""
        for stream_id in self.conn.pop_closed():
            stream = self._streams.pop(stream_id, None)
            if stream is not None:
                stream._set_closed()
        if not self._streams:
            self._streams_gone.set()

    def _contain(
        self, stream: Stream, callback: Callable[[BaseException], None] | Callable[[], None], *args
    ) -> None:
        """Run one stream's callback; whatever it raises resets that stream, not the link."""
        try:
            callback(*args)
        except Exception as exc:
            log.warning("stream %d failed and was reset: %s", stream.id, _describe(exc))
            log.debug("stream %d failure", stream.id, exc_info=True)
            with contextlib.suppress(Exception):
                if not self.ended.is_set():
                    self._reset(stream.id)
                stream._fail(StreamReset(f"stream {stream.id} failed: {_describe(exc)}"))

    # -- transport callbacks ------------------------------------------------------------

    def _on_data(self, data: memoryview) -> None:
        if self.ended.is_set():
            return
        self._dispatch(self.conn.receive_data(data, self._loop.time()))
        self._reap()
        if self.conn.has_data_to_send():
            self._schedule_flush()

    def _on_eof(self) -> None:
        self._on_lost(None)

    def _on_lost(self, exc: BaseException | None) -> None:
        if self.ended.is_set():
            return
        if exc is None and self.peer_closing.is_set():
            self._finish(None)  # it said goodbye, then closed
        else:
            self._finish(link_error(exc))

    def _dispatch(self, events: list[ev.Event]) -> None:
        for event in events:
            if isinstance(event, ev.DataReceived):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    self._contain(stream, stream._data, event.data)
            elif isinstance(event, ev.StreamOpened):
                stream = self._streams[event.stream_id] = Stream(self, event.stream_id)
                if self._handler is not None:
                    self._hand_over(stream, self._handler)
                else:
                    self._incoming.append(stream)
                    self._incoming_ready.set()
            elif isinstance(event, ev.StreamEnded):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    self._contain(stream, stream._ended)
            elif isinstance(event, ev.StreamReset):
                stream = self._streams.pop(event.stream_id, None)
                if not self._streams:
                    self._streams_gone.set()
                if stream is not None:
                    reset = StreamReset(f"stream {event.stream_id} reset by the peer")
                    self._contain(stream, stream._fail, reset)
            elif isinstance(event, ev.PongReceived):
                log.debug("pong: rtt %.2f ms", event.rtt * 1000)
            elif isinstance(event, ev.GoAwayReceived):
                if event.error_code in (GoAwayCode.NORMAL, GoAwayCode.MOVED):
                    self.peer_moved = event.error_code == GoAwayCode.MOVED
                    self.peer_closing.set()
                    self._incoming_ready.set()
                    if self.conn.local_goaway:
                        self._finish_after_flush(None)
                elif event.error_code == GoAwayCode.NOT_CONFIRMED:
                    self._finish_after_flush(PeerDeclined())
                else:
                    name = _GOAWAY_NAMES.get(event.error_code, "unknown")
                    self._finish_after_flush(
                        PeerAborted(
                            f"the peer ended the session with error code {event.error_code} "
                            f"({name})"
                        )
                    )
            elif isinstance(event, ev.ConnectionTerminated):
                self._finish_after_flush(PeerViolation(f"protocol error: {event.reason}"))

    def _finish_after_flush(self, error: LinkBroken | None) -> None:
        if self._pending_finish is None:
            self._pending_finish = (error,)
        self._schedule_flush()

    # -- writing ----------------------------------------------------------------------

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and not self.ended.is_set():
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Write what the core has, in large batches, until the transport is full."""
        self._flush_scheduled = False
        if self.ended.is_set():
            return
        conn, transport = self.conn, self._transport
        while not self._writing_paused and conn.has_data_to_send():
            transport.writelines(conn.data_to_send(WRITE_BATCH))
        self._reap()
        high_water = self._stream_high_water()
        for stream_id in list(self._dirty):
            stream = self._streams.get(stream_id)
            if stream is None:
                self._dirty.discard(stream_id)
            elif stream.write_buffered <= high_water:
                self._dirty.discard(stream_id)
                self._contain(stream, stream._writable)
        if not self._writing_paused and not conn.has_data_to_send():
            if self._pending_finish is not None:
                (error,) = self._pending_finish
                self._finish(error)

    # -- time ---------------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        while not self.ended.is_set():
            when = self.conn.get_timer()
            delay = 1.0 if when is None else min(1.0, max(0.0, when - self._loop.time()))
            await asyncio.sleep(delay)
            now = self._loop.time()
            for event in self.conn.handle_timer(now):
                if isinstance(event, ev.ConnectionTerminated):
                    self.abort(PeerUnresponsive(event.reason))
                    return
            if self.conn.has_data_to_send():
                self._schedule_flush()
            self._report_abuse(now)
            self._release_when_idle(now)

    def _release_when_idle(self, now: float) -> None:
        """After a burst of traffic, once the link has been quiet for RELEASE_IDLE seconds,
        give the memory its buffers used back to the kernel (malloc keeps it otherwise)."""
        moved = self.bytes_sent + self.bytes_received
        if moved != self._moved:
            self._moved, self._moved_when = moved, now
        elif moved - self._moved_at_release >= RELEASE_AFTER and now - self._moved_when >= (
            RELEASE_IDLE
        ):
            self._moved_at_release = moved
            self.memory_releases += 1
            release_free_memory()

    def _report_abuse(self, now: float, final: bool = False) -> None:
        """One line per interval for opens we refused, however many there were (and one
        for the last interval when the session ends)."""
        if now < self._next_report and not final:
            return
        refused, throttled = self.conn.refused_opens, self.conn.throttled_opens
        new_refused, new_throttled = refused - self._reported[0], throttled - self._reported[1]
        if not (new_refused or new_throttled):
            return
        self._reported = (refused, throttled)
        self._next_report = now + ABUSE_REPORT_INTERVAL
        config = self.conn.config
        parts = []
        if new_refused:
            parts.append(
                f"{new_refused} over the limit of {config.max_streams} open streams "
                f"({config.max_pending_accepts} waiting)"
            )
        if new_throttled:
            parts.append(
                f"{new_throttled} over {config.max_open_rate:g} opens or "
                f"{config.max_reset_rate:g} resets a second"
            )
        log.warning("refused streams the peer opened: %s", "; ".join(parts))


_GOAWAY_NAMES = {
    GoAwayCode.PROTOCOL_ERROR: "protocol error",
    GoAwayCode.INTERNAL_ERROR: "internal error",
    GoAwayCode.CANCELLED: "it was interrupted or could not finish",
}


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _abort_transport(transport: asyncio.BaseTransport) -> None:
    """Close with RST (SO_LINGER 0): no half-dead 4-tuple is left in the kernel or a NAT."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        linger_zero(sock)
    transport.abort()


def linger_zero(sock: socket.socket) -> None:
    """Make the next close send RST, as a refused, reset or dead connection should look."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
