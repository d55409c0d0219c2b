"""The asyncio driver of the mux core: the link's protocol, a timer, and Stream objects.

The session becomes the link transport's protocol: a BufferedProtocol that has TLS decrypt
into one reused buffer, which the core parses in place. Writes are flushed from callbacks,
once per loop turn, in large batches (the core puts control frames first and takes turns
across streams), and stop while the transport's buffer is full. Received data goes to the
stream's buffer, bounded by the window we granted, or straight to a consumer (splice), so
no stream can hold up the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Protocol

from tete_tunnel.carrier import Carrier
from tete_tunnel.errors import LinkLost, TeteError
from tete_tunnel.mux import events as ev
from tete_tunnel.mux.connection import Config, Connection
from tete_tunnel.mux.errors import GoAwayCode, LocalProtocolError

log = logging.getLogger("tete_tunnel")

READ_BUFFER = 1024 * 1024  # one TLS read lands here, and is parsed in place
WRITE_BATCH = 512 * 1024  # bytes per transport write: large frames, full TLS records
TRANSPORT_HIGH_WATER = 512 * 1024  # the link transport's buffer before we stop writing
STREAM_HIGH_WATER = 256 * 1024  # a stream writer's drain() waits while more is queued
LINGER = 2.0  # after our go-away, how long we wait for the peer to close first
KEEPALIVE_INTERVAL = 10.0
KEEPALIVE_TIMEOUT = 30.0


class PeerLeft(Exception):
    """The peer said go-away and closed: an orderly end, not an error."""


class StreamReset(TeteError):
    pass


class Consumer(Protocol):
    """Takes a stream's incoming data as it arrives (instead of read())."""

    def stream_data(self, data: bytes) -> None: ...
    def stream_eof(self) -> None: ...
    def stream_error(self, error: BaseException) -> None: ...


class Stream:
    """One mux stream with the shape of asyncio's StreamReader/StreamWriter pair."""

    def __init__(self, session: Session, stream_id: int) -> None:
        self._session = session
        self.id = stream_id
        self._buffer: deque[bytes] = deque()
        self._buffered = 0
        self._eof = False  # the peer's FIN arrived
        self._eof_sent = False
        self._error: BaseException | None = None
        self._readable = asyncio.Event()
        self._drained = asyncio.Event()
        self._closed = asyncio.Event()
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

    def attach(self, consumer: Consumer) -> None:
        """From now on, incoming data goes to `consumer`; it grants credit with credit()."""
        self._consumer = consumer
        while self._buffer:
            data = self._buffer.popleft()
            self._buffered -= len(data)
            consumer.stream_data(data)
        if self._eof:
            consumer.stream_eof()
        elif self._error is not None:
            consumer.stream_error(self._error)

    def credit(self, n: int) -> None:
        """The application has taken n bytes: the peer may send that much more."""
        self._session._consumed(self.id, n)

    # -- writing ----------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        self._session._send(self.id, data)

    @property
    def write_buffered(self) -> int:
        return self._session.conn.send_buffered(self.id)

    async def drain(self) -> None:
        while self.write_buffered > STREAM_HIGH_WATER:
            if self._error is not None:
                raise self._error
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
        await self._closed.wait()

    def is_closing(self) -> bool:
        return self._eof_sent or self._error is not None

    # -- called by the session ----------------------------------------------------------

    def _data(self, data: bytes) -> None:
        if self._discard:
            self.credit(len(data))
        elif self._consumer is not None:
            self._consumer.stream_data(data)
        else:
            self._buffer.append(data)
            self._buffered += len(data)
            self._readable.set()

    def _ended(self) -> None:
        self._eof = True
        self._readable.set()
        if self._consumer is not None:
            self._consumer.stream_eof()

    def _writable(self) -> None:
        self._drained.set()
        if self.on_drained is not None:
            self.on_drained()

    def _fail(self, error: BaseException, notify: bool = True) -> None:
        if self._error is None:
            self._error = error
            if notify and self._consumer is not None and not self._eof:
                self._consumer.stream_error(error)
        self._readable.set()
        self._drained.set()
        self._closed.set()


class _LinkProtocol(asyncio.BufferedProtocol):
    """The session's face to the transport: reads land in one reused buffer."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._buffer = memoryview(bytearray(READ_BUFFER))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self._session._on_data(self._buffer[:nbytes])

    def eof_received(self) -> bool:
        self._session._on_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._session._on_lost(exc)

    def pause_writing(self) -> None:
        self._session._writing_paused = True

    def resume_writing(self) -> None:
        self._session._writing_paused = False
        self._session._schedule_flush()


class Session:
    """Owns the link while in use (`async with`), and the timer that keeps it alive."""

    def __init__(
        self,
        carrier: Carrier,
        *,
        client: bool,
        config: Config | None = None,
        keepalive: bool = False,
    ) -> None:
        if config is None:
            config = Config(
                keepalive_interval=KEEPALIVE_INTERVAL if keepalive else None,
                keepalive_timeout=KEEPALIVE_TIMEOUT,
            )
        self.conn = Connection(client=client, config=config)
        self._carrier = carrier
        assert carrier.transport is not None
        self._transport: asyncio.Transport = carrier.transport
        self._loop = asyncio.get_running_loop()
        self._streams: dict[int, Stream] = {}
        self._incoming: deque[Stream] = deque()  # bounded by the core's pending limit
        self._incoming_ready = asyncio.Event()  # set when a stream arrives or the session ends
        self._writing_paused = False
        self._flush_scheduled = False
        self._pending_finish: tuple[BaseException | None] | None = None
        self._dirty: set[int] = set()  # streams written since the last flush
        self._idle = asyncio.Event()  # nothing left to write, or the session has ended
        self._peer_gone = asyncio.Event()  # the connection's far end has closed
        self._timer: asyncio.Task[None] | None = None
        self.ended = asyncio.Event()
        self.error: BaseException | None = None  # why the session ended, if not orderly
        self.peer_left = False

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
            self._on_lost(carrier.error)  # type: ignore[arg-type]
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
                self._finish(exc if isinstance(exc, Exception) else LinkLost("cancelled"))
        finally:
            if self._timer is not None:
                self._timer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._timer

    async def close(self, code: GoAwayCode = GoAwayCode.NORMAL) -> None:
        """Orderly end: go away, flush, let the peer close first (no RST), then close."""
        if self.ended.is_set():
            return
        # The peer takes go-away as the end of everything: streams still open end there
        # without a clean EOF (it sees PeerLeft), and data still queued on them is dropped.
        # Callers that want a stream's data delivered wait for it to close first.
        self.conn.go_away(code)
        self._schedule_flush()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LINGER):
                await self._idle.wait()  # the go-away is out
                if not self.conn.remote_goaway:
                    await self._peer_gone.wait()
        self._finish(None)

    def _finish(self, error: BaseException | None) -> None:
        """End the session now: fail streams, stop the timer, drop the transport."""
        if self.ended.is_set():
            return
        if error is not None and self.error is None:
            self.error = error
        failure: BaseException = (
            error if error is not None else (PeerLeft() if self.peer_left else LinkLost("closed"))
        )
        for stream in list(self._streams.values()):
            stream._fail(failure)
        self._streams.clear()
        self.ended.set()
        self._idle.set()
        self._incoming_ready.set()
        if self._timer is not None and self._timer is not asyncio.current_task():
            self._timer.cancel()
        if error is None:
            self._transport.close()  # close_notify after what is buffered
        else:
            self._transport.abort()

    async def wait_ended(self) -> None:
        """Until the session ends; raises why if it was not orderly."""
        await self.ended.wait()
        if self.error is not None:
            raise self.error

    # -- streams ----------------------------------------------------------------------

    def open_stream(self) -> Stream:
        if self.ended.is_set():
            raise self.error or LinkLost("the session has ended")
        try:
            stream_id = self.conn.open_stream()
        except LocalProtocolError as exc:
            raise TeteError(str(exc)) from exc
        stream = self._streams[stream_id] = Stream(self, stream_id)
        self._schedule_flush()
        return stream

    async def accept(self) -> Stream:
        """The next stream the peer opened (its ACK goes out now)."""
        while not self._incoming:
            if self.ended.is_set():
                raise self.error or (PeerLeft() if self.peer_left else LinkLost("session ended"))
            self._incoming_ready.clear()
            await self._incoming_ready.wait()
        stream = self._incoming.popleft()
        if stream.id in self.conn.stream_ids:
            self.conn.accept_stream(stream.id)
            self._schedule_flush()
        return stream

    def _send(self, stream_id: int, data: bytes | bytearray | memoryview) -> None:
        try:
            self.conn.send(stream_id, data)
        except LocalProtocolError as exc:
            raise TeteError(f"cannot write: {exc}") from exc
        self._dirty.add(stream_id)
        self._schedule_flush()

    def _end(self, stream_id: int) -> None:
        with contextlib.suppress(LocalProtocolError):
            self.conn.end_stream(stream_id)
        self._schedule_flush()

    def _reset(self, stream_id: int) -> None:
        with contextlib.suppress(LocalProtocolError):
            self.conn.reset_stream(stream_id)
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
                stream._closed.set()

    # -- transport callbacks ------------------------------------------------------------

    def _on_data(self, data: memoryview) -> None:
        if self.ended.is_set():
            return
        self._dispatch(self.conn.receive_data(data, self._loop.time()))
        self._reap()
        if self.conn.has_data_to_send():
            self._schedule_flush()

    def _on_eof(self) -> None:
        self._peer_gone.set()
        if self.conn.local_goaway or self.conn.remote_goaway:
            self._finish(None)
        else:
            self._lost("connection to peer lost: it closed without saying goodbye")

    def _on_lost(self, exc: BaseException | None) -> None:
        self._peer_gone.set()
        if self.ended.is_set():
            return
        if exc is None and (self.conn.local_goaway or self.conn.remote_goaway):
            self._finish(None)
        else:
            self._lost(f"connection to peer lost: {exc or 'it closed without saying goodbye'}")

    def _lost(self, reason: str) -> None:
        log.debug("session lost: %s", reason)
        self._finish(LinkLost(reason))

    def _dispatch(self, events: list[ev.Event]) -> None:
        for event in events:
            if isinstance(event, ev.DataReceived):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream._data(event.data)
            elif isinstance(event, ev.StreamOpened):
                stream = self._streams[event.stream_id] = Stream(self, event.stream_id)
                self._incoming.append(stream)
                self._incoming_ready.set()
            elif isinstance(event, ev.StreamEnded):
                stream = self._streams.get(event.stream_id)
                if stream is not None:
                    stream._ended()
            elif isinstance(event, ev.StreamReset):
                stream = self._streams.pop(event.stream_id, None)
                if stream is not None:
                    stream._fail(StreamReset(f"stream {event.stream_id} reset by the peer"))
            elif isinstance(event, ev.PongReceived):
                log.debug("pong: rtt %.2f ms", event.rtt * 1000)
            elif isinstance(event, ev.GoAwayReceived):
                # Our peers send go-away only when ending the whole session (see
                # docs/PROTOCOL.md), so its streams end here too, after what arrived.
                self.peer_left = True
                if event.error_code != GoAwayCode.NORMAL:
                    log.warning("the peer ended the session: error code %d", event.error_code)
                    self._finish_after_flush(
                        LinkLost(f"the peer ended the session with error code {event.error_code}")
                    )
                else:
                    self._finish_after_flush(None)
            elif isinstance(event, ev.ConnectionTerminated):
                log.warning("error: %s; closing the session", event.reason)
                self._finish_after_flush(LinkLost(f"protocol error: {event.reason}"))

    def _finish_after_flush(self, error: BaseException | None) -> None:
        self._pending_finish = (error,)
        self._schedule_flush()

    # -- writing ----------------------------------------------------------------------

    def _schedule_flush(self) -> None:
        self._idle.clear()
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
            transport.write(b"".join(conn.data_to_send(WRITE_BATCH)))
        self._reap()
        for stream_id in list(self._dirty):
            stream = self._streams.get(stream_id)
            if stream is None:
                self._dirty.discard(stream_id)
            elif stream.write_buffered <= STREAM_HIGH_WATER:
                self._dirty.discard(stream_id)
                stream._writable()
        if not self._writing_paused and not conn.has_data_to_send():
            self._idle.set()
            if self._pending_finish is not None:
                (error,) = self._pending_finish
                self._finish(error)

    # -- time ---------------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        while not self.ended.is_set():
            when = self.conn.get_timer()
            delay = 1.0 if when is None else min(1.0, max(0.0, when - self._loop.time()))
            await asyncio.sleep(delay)
            for event in self.conn.handle_timer(self._loop.time()):
                if isinstance(event, ev.ConnectionTerminated):
                    self._lost(f"connection to peer lost: {event.reason}")
                    return
            if self.conn.has_data_to_send():
                self._schedule_flush()
