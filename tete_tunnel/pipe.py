"""`pipe`: stdin to the peer, the peer to stdout, binary-safe, with half-close.

Standard input and output are moved by two daemon threads with blocking I/O, because they
may be anything (a pipe, a terminal, a regular file, /dev/null) and the event loop can wait on
none but the first two; daemon threads never hold up exit when a terminal read is pending.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Protocol

from tete_tunnel import log as logmod
from tete_tunnel import preamble
from tete_tunnel.errors import LinkLost, TeteError
from tete_tunnel.link import LinkConfig, establish
from tete_tunnel.session import PeerLeft, Session, Stream, StreamReset
from tete_tunnel.shutdown import Interrupted, Signals

log = logging.getLogger("tete_tunnel")

CHUNK = 256 * 1024


class ByteStream(Protocol):
    """What pipe needs of a link: a half-closable byte stream (a mux stream in time)."""

    async def read(self) -> bytes: ...  # b"" at the peer's end of data
    async def write(self, data: bytes) -> None: ...
    async def write_eof(self) -> None: ...
    async def wait_peer_leaving(self) -> None: ...  # raises PeerLeft when it does


class StdinSource:
    """Reads a file descriptor in a daemon thread, at most one chunk ahead of the consumer."""

    def __init__(self, fd: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._chunks: asyncio.Queue[bytes | OSError] = asyncio.Queue(maxsize=1)
        self._fd = fd
        threading.Thread(target=self._run, name="stdin", daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                chunk: bytes | OSError = os.read(self._fd, CHUNK)
            except OSError as exc:
                chunk = exc
            try:
                asyncio.run_coroutine_threadsafe(self._chunks.put(chunk), self._loop).result()
            except RuntimeError:  # the loop is gone: we are exiting
                return
            if not isinstance(chunk, bytes) or not chunk:
                return

    async def read(self) -> bytes:
        chunk = await self._chunks.get()
        if isinstance(chunk, OSError):
            raise TeteError(f"cannot read standard input: {chunk.strerror}")
        return chunk


class StdoutSink:
    """Writes a file descriptor in a daemon thread; `write` waits while two chunks are queued."""

    def __init__(self, fd: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._fd = fd
        self._room = asyncio.Semaphore(2)
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._closed = self._loop.create_future()
        self._error: OSError | None = None
        threading.Thread(target=self._run, name="stdout", daemon=True).start()

    def _run(self) -> None:
        error: OSError | None = None
        while (chunk := self._queue.get()) is not None:
            if error is None:
                try:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(self._fd, view) :]
                except OSError as exc:
                    error = exc
            self._call(self._done_one, error)
        if error is None:
            # Release the real stdout so the reader downstream sees EOF, but keep fd 1 valid.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._fd)
            os.close(devnull)
        self._call(self._finish, error)

    def _call(self, fn: Callable[[OSError | None], None], arg: OSError | None) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, arg)
        except RuntimeError:
            pass  # the loop is gone: we are exiting

    def _done_one(self, error: OSError | None) -> None:
        self._error = self._error or error
        self._room.release()

    def _finish(self, error: OSError | None) -> None:
        if not self._closed.done():
            self._closed.set_result(error)

    def _check(self) -> None:
        if self._error is not None:
            raise TeteError(f"cannot write standard output: {self._error.strerror}")

    async def write(self, data: bytes) -> None:
        self._check()
        await self._room.acquire()
        self._queue.put(data)

    async def close(self) -> None:
        self._queue.put(None)
        error = await self._closed
        if error is not None:
            raise TeteError(f"cannot write standard output: {error.strerror}")


class PipeStream:
    """A mux stream seen as pipe's byte stream; the opener first reads the peer's answer."""

    def __init__(self, session: Session, stream: Stream, *, awaiting_answer: bool) -> None:
        self._session = session
        self._stream = stream
        self._awaiting_answer = awaiting_answer

    async def read(self) -> bytes:
        try:
            if self._awaiting_answer:
                answer = await preamble.read_message(self._stream)
                self._awaiting_answer = False
                if isinstance(answer, preamble.Refuse):
                    raise TeteError(f"the peer refused the pipe: {answer.reason}")
                if not isinstance(answer, preamble.Accept):
                    raise TeteError("the peer answered the pipe request with nonsense")
            return await self._stream.read(CHUNK)
        except StreamReset as exc:
            raise LinkLost("the peer reset the pipe") from exc

    async def write(self, data: bytes) -> None:
        self._stream.write(data)
        await self._stream.drain()

    async def write_eof(self) -> None:
        self._stream.write_eof()

    async def wait_peer_leaving(self) -> None:
        await self._session.wait_ended()
        raise PeerLeft

    async def wait_delivered(self) -> None:
        """Until our data and FIN have left (the stream is closed both ways)."""
        await self._stream.wait_closed()


async def _send_all(source: StdinSource, stream: ByteStream) -> None:
    while chunk := await source.read():
        await stream.write(chunk)
    await stream.write_eof()


async def _receive_all(stream: ByteStream, sink: StdoutSink, status: _Status) -> None:
    while chunk := await stream.read():
        await sink.write(chunk)
    await sink.close()
    status.peer_done = True
    logmod.event("Peer closed connection")


class _Status:
    peer_done = False


async def run_pipe(
    stream: ByteStream, stdin_fd: int = 0, stdout_fd: int = 1, status: _Status | None = None
) -> None:
    """Both directions at once; returns when both are done, raises on the first failure.

    Once the peer's data has ended we keep listening while ours is still being sent, so a
    peer that leaves early ends our side at once instead of failing a later write.
    """
    status = status or _Status()
    source, sink = StdinSource(stdin_fd), StdoutSink(stdout_fd)
    try:
        async with asyncio.TaskGroup() as tg:
            send = tg.create_task(_send_all(source, stream))
            await tg.create_task(_receive_all(stream, sink, status))
            if not send.done():
                watch = tg.create_task(stream.wait_peer_leaving())
                await asyncio.wait([send, watch], return_when=asyncio.FIRST_COMPLETED)
                watch.cancel()
    except BaseExceptionGroup as group:
        raise _most_telling(group) from None


def _most_telling(group: BaseExceptionGroup) -> BaseException:
    """The peer leaving explains a failed write; otherwise our own error, else the group."""
    leaves = [e for e in group.exceptions if isinstance(e, PeerLeft)]
    ours = [e for e in group.exceptions if isinstance(e, TeteError)]
    return (leaves or ours or [group])[0]


async def _open_pipe(session: Session, is_opener: bool) -> PipeStream:
    """The TLS client opens the pipe stream; the server accepts it (and only it)."""
    if is_opener:
        stream = session.open_stream()
        stream.write(preamble.encode(preamble.Pipe()))
        return PipeStream(session, stream, awaiting_answer=True)
    while True:
        stream = await session.accept()
        try:
            request = await preamble.read_message(stream)
        except preamble.PreambleError as exc:
            log.warning("refused a stream from the peer: %s", exc)
            stream.reset()
            continue
        if isinstance(request, preamble.Pipe):
            stream.write(preamble.encode(preamble.Accept()))
            return PipeStream(session, stream, awaiting_answer=False)
        preamble.refuse(stream, "this peer runs `tete-tunnel pipe`, not `forward`")


async def _refuse_streams(session: Session) -> None:
    """Pipe serves one stream; anything else the peer opens is refused with a reason."""
    while True:
        try:
            stream = await session.accept()
        except (PeerLeft, TeteError):
            return  # the session ended; the pipe itself reports why
        preamble.refuse(stream, "this peer runs `tete-tunnel pipe` and serves nothing else")


async def _pipe_over(
    session: Session, is_opener: bool, stdin_fd: int, stdout_fd: int, status: _Status
) -> None:
    try:
        async with asyncio.TaskGroup() as tg:
            stream = await _open_pipe(session, is_opener)
            refuser = tg.create_task(_refuse_streams(session))
            try:
                await run_pipe(stream, stdin_fd, stdout_fd, status)
                await stream.wait_delivered()  # only then may the session go away
            finally:
                refuser.cancel()
    except BaseExceptionGroup as group:
        raise _most_telling(group) from None


async def pipe_command(config: LinkConfig, stdin_fd: int = 0, stdout_fd: int = 1) -> None:
    """The whole `tete-tunnel pipe`: link up, one stream both ways, close in order."""
    with Signals() as signals:
        try:
            link = await signals.interruptible(establish(config))
        except Interrupted:
            raise TeteError("interrupted before the peer was connected") from None
        status = _Status()
        async with Session(
            link.carrier, client=link.is_tls_client, keepalive=config.keepalive
        ) as session:
            try:
                await signals.interruptible(
                    _pipe_over(session, link.is_tls_client, stdin_fd, stdout_fd, status)
                )
            except Interrupted:
                await session.close()
                logmod.event("Closed connection")
                return
            except PeerLeft:
                if not status.peer_done:
                    logmod.event("Peer closed connection")
                return
            await session.close()
        if session.error is not None:
            raise session.error
        logmod.event("Closed connection")
