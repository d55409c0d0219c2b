"""The asyncio driver of the mux core: one reader, one writer, a timer, and Stream objects.

The reader never waits on a stream: received data goes to that stream's buffer, which the
window we granted bounds. The writer batches frames into large writes (the core puts control
frames first and takes turns across streams). Streams look like asyncio streams, so forward
and pipe code treat them like sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque
from types import TracebackType

from tete_tunnel.errors import LinkLost, TeteError
from tete_tunnel.mux import events as ev
from tete_tunnel.mux.connection import Config, Connection
from tete_tunnel.mux.errors import GoAwayCode, LocalProtocolError

log = logging.getLogger("tete_tunnel")

READ_SIZE = 256 * 1024
WRITE_BATCH = 256 * 1024  # bytes per socket write: large enough to fill TLS records
STREAM_HIGH_WATER = 256 * 1024  # a writer's drain() waits while more is queued
LINGER = 2.0  # after our go-away, how long we wait for the peer to close first
KEEPALIVE_INTERVAL = 10.0
KEEPALIVE_TIMEOUT = 30.0


class PeerLeft(Exception):
    """The peer said go-away and closed: an orderly end, not an error."""


class StreamReset(TeteError):
    pass


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
        self._session._consumed(self.id, len(data))
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

    # -- writing ----------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise self._error
        self._session._send(self.id, data)

    async def drain(self) -> None:
        while self._session.conn.send_buffered(self.id) > STREAM_HIGH_WATER:
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
            self._fail(StreamReset(f"stream {self.id} reset by us"))

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

    _discard = False

    def _data(self, data: bytes) -> None:
        if self._discard:
            self._session._consumed(self.id, len(data))
            return
        self._buffer.append(data)
        self._buffered += len(data)
        self._readable.set()

    def _ended(self) -> None:
        self._eof = True
        self._readable.set()

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._readable.set()
        self._drained.set()
        self._closed.set()


class Session:
    """Owns the link while in use (`async with`), and the tasks that move its bytes."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
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
        self._reader = reader
        self._writer = writer
        self._loop = asyncio.get_running_loop()
        self._streams: dict[int, Stream] = {}
        self._incoming: asyncio.Queue[Stream] = asyncio.Queue()
        self._want_write = asyncio.Event()
        self._peer_gone = asyncio.Event()  # the reader saw the connection end
        self._tasks: asyncio.TaskGroup | None = None
        self._own_tasks: list[asyncio.Task[None]] = []
        self.ended = asyncio.Event()
        self.error: BaseException | None = None  # why the session ended, if not orderly
        self.peer_left = False

    # -- lifetime ---------------------------------------------------------------------

    async def __aenter__(self) -> Session:
        self._tasks = asyncio.TaskGroup()
        await self._tasks.__aenter__()
        self._own_tasks = [
            self._tasks.create_task(self._read_loop()),
            self._tasks.create_task(self._write_loop()),
            self._tasks.create_task(self._timer_loop()),
        ]
        self.conn.ping(self._loop.time())  # a first RTT sample, for window tuning
        self.conn.start_keepalive(self._loop.time())
        self._want_write.set()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._tasks is not None
        try:
            if exc is None:
                await self.close()
            else:
                self._abort(exc if isinstance(exc, Exception) else LinkLost("cancelled"))
        finally:
            # Our own tasks are cancelled by now; the body's exception passes through as
            # it is, not wrapped in a group.
            await self._tasks.__aexit__(None, None, None)

    async def close(self, code: GoAwayCode = GoAwayCode.NORMAL) -> None:
        """Orderly end: go away, flush, let the peer close first (no RST), then close."""
        if self.ended.is_set():
            return
        # The peer takes go-away as the end of everything: streams still open end there
        # without a clean EOF (it sees PeerLeft), and data still queued on them is dropped.
        # Callers that want a stream's data delivered wait for it to close first.
        self.conn.go_away(code)
        self._want_write.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LINGER):
                await self._flushed()
                if not self.conn.remote_goaway:
                    await self._peer_gone.wait()
        self._finish(None)

    async def _flushed(self) -> None:
        while self.conn.has_data_to_send() and not self.ended.is_set():
            await asyncio.sleep(0)
            self._want_write.set()
        with contextlib.suppress(ConnectionError, ssl.SSLError, OSError):
            await self._writer.drain()

    def _abort(self, error: BaseException) -> None:
        self._finish(error)

    def _finish(self, error: BaseException | None) -> None:
        """End the session now: fail streams, stop the tasks, drop the transport."""
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
        self._want_write.set()
        current = asyncio.current_task()
        for task in self._own_tasks:
            if task is not current:
                task.cancel()
        if error is None:
            self._writer.close()  # close_notify; the transport is dropped with the loop
        else:
            self._writer.transport.abort()

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
        self._want_write.set()
        return stream

    async def accept(self) -> Stream:
        """The next stream the peer opened (its ACK goes out now)."""
        get = asyncio.ensure_future(self._incoming.get())
        ended = asyncio.ensure_future(self.ended.wait())
        try:
            await asyncio.wait([get, ended], return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
            if not get.done():
                get.cancel()
        if not get.done() or get.cancelled():
            raise self.error or (PeerLeft() if self.peer_left else LinkLost("session ended"))
        stream = get.result()
        self.conn.accept_stream(stream.id)
        self._want_write.set()
        return stream

    def _send(self, stream_id: int, data: bytes | bytearray | memoryview) -> None:
        try:
            self.conn.send(stream_id, data)
        except LocalProtocolError as exc:
            raise TeteError(f"cannot write: {exc}") from exc
        self._want_write.set()

    def _end(self, stream_id: int) -> None:
        with contextlib.suppress(LocalProtocolError):
            self.conn.end_stream(stream_id)
        self._want_write.set()

    def _reset(self, stream_id: int) -> None:
        with contextlib.suppress(LocalProtocolError):
            self.conn.reset_stream(stream_id)
        self._want_write.set()
        self._reap()

    def _consumed(self, stream_id: int, n: int) -> None:
        if n and not self.ended.is_set():
            self.conn.consumed(stream_id, n, self._loop.time())
            if self.conn.has_data_to_send():
                self._want_write.set()

    def _reap(self) -> None:
        """Drop the Stream objects whose state the core has forgotten."""
        for stream_id in self.conn.pop_closed():
            stream = self._streams.pop(stream_id, None)
            if stream is not None:
                stream._closed.set()

    # -- tasks ------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            while not self.ended.is_set():
                try:
                    data = await self._reader.read(READ_SIZE)
                except (ConnectionError, ssl.SSLError, OSError) as exc:
                    if not self.ended.is_set():
                        self._lost(f"connection to peer lost: {exc or type(exc).__name__}")
                    return
                if not data:
                    self._peer_gone.set()
                    if self.conn.local_goaway or self.conn.remote_goaway:
                        self._finish(None)
                    else:
                        self._lost("connection to peer lost: it closed without saying goodbye")
                    return
                self._dispatch(self.conn.receive_data(data, self._loop.time()))
                self._reap()
                if self.conn.has_data_to_send():
                    self._want_write.set()
        finally:
            self._peer_gone.set()

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
                self._incoming.put_nowait(stream)  # bounded by the core's pending limit
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
                    self._finish_after_flush()
            elif isinstance(event, ev.ConnectionTerminated):
                log.warning("error: %s; closing the session", event.reason)
                self._want_write.set()
                self._finish_after_flush(LinkLost(f"protocol error: {event.reason}"))

    def _finish_after_flush(self, error: BaseException | None = None) -> None:
        self._pending_finish = (error,)
        self._want_write.set()

    _pending_finish: tuple[BaseException | None] | None = None

    async def _write_loop(self) -> None:
        conn, writer = self.conn, self._writer
        while not self.ended.is_set():
            await self._want_write.wait()
            self._want_write.clear()
            try:
                while conn.has_data_to_send() and not self.ended.is_set():
                    writer.write(b"".join(conn.data_to_send(WRITE_BATCH)))
                    self._reap()
                    self._wake_drainers()
                    await writer.drain()
            except (ConnectionError, ssl.SSLError, OSError) as exc:
                self._lost(f"connection to peer lost: {exc or type(exc).__name__}")
                return
            self._wake_drainers()
            if self._pending_finish is not None:
                (error,) = self._pending_finish
                self._finish(error)

    def _wake_drainers(self) -> None:
        for stream in self._streams.values():
            if self.conn.send_buffered(stream.id) <= STREAM_HIGH_WATER:
                stream._drained.set()

    async def _timer_loop(self) -> None:
        while not self.ended.is_set():
            when = self.conn.get_timer()
            delay = 1.0 if when is None else min(1.0, max(0.0, when - self._loop.time()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self.ended.wait()
            if self.ended.is_set():
                return
            events = self.conn.handle_timer(self._loop.time())
            for event in events:
                if isinstance(event, ev.ConnectionTerminated):
                    self._lost(f"connection to peer lost: {event.reason}")
            if self.conn.has_data_to_send():
                self._want_write.set()
