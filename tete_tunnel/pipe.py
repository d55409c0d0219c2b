"""`pipe`: stdin to the peer, the peer to stdout, binary-safe, with half-close.

Nothing truncated is ever reported as complete, in either direction:
- Only the end of standard input ends our direction cleanly (FIN). A signal before that
  aborts the stream (RST), and the peer exits 1 saying so.
- We exit 0 only when the peer has confirmed it took all of our data: its go-away, which it
  sends once it has written everything it received (docs/PROTOCOL.md, "receipt").
- When standard input is a terminal, the end of the peer's data ends our direction too, so
  `tete-tunnel pipe ... | tar x` typed at a prompt ends by itself.

Standard input and output are moved by two daemon threads with blocking I/O, because they
may be anything (a pipe, a terminal, a regular file, /dev/null) and the event loop can wait on
none but the first two. The threads hand over chunks with call_soon_threadsafe only (never a
coroutine), so an ending loop cannot leave them with a traceback or an unawaited coroutine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import select
import stat
import threading
from collections import deque
from collections.abc import Callable

from tete_tunnel import log as logmod
from tete_tunnel import preamble, status
from tete_tunnel.errors import Closed, LinkBroken, StreamReset, TeteError, TransferAborted
from tete_tunnel.mux.errors import GoAwayCode
from tete_tunnel.secure import SecureLink
from tete_tunnel.session import LINGER, Session, Stream
from tete_tunnel.supervisor import Ending

log = logging.getLogger("tete_tunnel")

CHUNK = 256 * 1024
_POLLRDHUP = getattr(select, "POLLRDHUP", 0x2000)  # a socket's peer shut its writing side
# After a signal, how long the transfer may take to finish by itself when our input has
# ended (ssh closes a ProxyCommand's standard input and sends it SIGHUP right after, at a
# normal logout). Only then: with input still open a signal aborts at once. Generous, as a
# loaded machine may not run our stdin thread for a while (0.5 s failed 1 run in 30 in CI).
SIGNAL_GRACE = 2.0


class StdinSource:
    """Reads a file descriptor in a daemon thread, at most one chunk ahead of the consumer."""

    def __init__(self, fd: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._fd = fd
        self._chunks: deque[bytes | OSError] = deque()
        self._arrived = asyncio.Event()
        self._may_read = threading.Semaphore(1)
        self._stopped = False
        self.ended = False  # EOF (or an error) was read
        self.ended_at = 0.0  # when (loop time)
        threading.Thread(target=self._run, name="stdin", daemon=True).start()

    def _run(self) -> None:
        while True:
            self._may_read.acquire()
            if self._stopped:
                return
            try:
                chunk: bytes | OSError = os.read(self._fd, CHUNK)
            except OSError as exc:
                chunk = exc
            try:
                self._loop.call_soon_threadsafe(self._put, chunk)
            except RuntimeError:  # the loop is closed: we are exiting
                return
            if not isinstance(chunk, bytes) or not chunk:
                return

    def _put(self, chunk: bytes | OSError) -> None:
        self._chunks.append(chunk)
        self._arrived.set()

    async def read(self) -> bytes:
        while not self._chunks:
            self._arrived.clear()
            await self._arrived.wait()
        chunk = self._chunks.popleft()
        if isinstance(chunk, bytes) and chunk:
            self._may_read.release()
            return chunk
        self.ended = True  # the end of input, or an error: the thread has stopped
        self.ended_at = self._loop.time()
        if isinstance(chunk, OSError):
            raise TeteError(f"cannot read standard input: {chunk.strerror}")
        return chunk

    def at_eof_now(self) -> bool:
        """Whatever writes our input has gone (bytes may still be left to read): a pipe or
        socket whose writer closed, or a regular file, which always ends. A terminal never."""
        if self.ended or any(isinstance(c, bytes) and not c for c in self._chunks):
            return True
        try:
            if os.isatty(self._fd):
                return False
            if stat.S_ISREG(os.fstat(self._fd).st_mode):
                return True
            poller = select.poll()
            poller.register(self._fd, select.POLLIN | _POLLRDHUP)
            events = poller.poll(0)
        except (OSError, ValueError):
            return False
        # POLLHUP: every writer of a pipe has closed, even with bytes still unread (ssh
        # writes its last packets, closes, and sends SIGHUP within a millisecond).
        return any(mask & (select.POLLHUP | _POLLRDHUP) for _, mask in events)

    def stop(self) -> None:
        """Read no more (a read already under way is abandoned with the thread)."""
        self._stopped = True
        self._may_read.release()


class StdoutSink:
    """Writes a file descriptor in a daemon thread; `write` waits while two chunks are queued."""

    def __init__(self, fd: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._fd = fd
        self._room = asyncio.Semaphore(2)
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._closed = self._loop.create_future()
        self._error: OSError | None = None
        self._closing = False
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
            with contextlib.suppress(OSError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self._fd)
                os.close(devnull)
        self._call(self._finish, error)

    def _call(self, fn: Callable[[OSError | None], None], arg: OSError | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: we are exiting
            self._loop.call_soon_threadsafe(fn, arg)

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
        self._check()
        self._queue.put(data)

    async def close(self) -> None:
        """Until everything written has reached the descriptor (which is then released)."""
        if not self._closing:
            self._closing = True
            self._queue.put(None)
        error = await asyncio.shield(self._closed)
        if error is not None:
            raise TeteError(f"cannot write standard output: {error.strerror}")


async def open_pipe(session: Session, link: SecureLink) -> Stream:
    """The TLS client opens the pipe stream; the server accepts it (and only it)."""
    if link.is_tls_client:
        stream = session.open_stream()
        stream.write(preamble.encode(preamble.Pipe()))
        answer = await preamble.read_message(stream)
        if isinstance(answer, preamble.Refuse):
            raise TeteError(f"the peer refused the pipe: {answer.reason}")
        if not isinstance(answer, preamble.Accept):
            raise TeteError("the peer answered the pipe request with nonsense")
        return stream
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
            return stream
        preamble.refuse(stream, "this peer runs `tete-tunnel pipe`, not `forward`")


async def _refuse_streams(session: Session) -> None:
    """Pipe serves one stream; anything else the peer opens is refused with a reason."""
    while True:
        try:
            stream = await session.accept()
        except TeteError:
            return  # the session is ending; the pipe itself reports why
        preamble.refuse(stream, "this peer runs `tete-tunnel pipe` and serves nothing else")


class PipeApp:
    """The application of `tete-tunnel pipe`, for the supervisor."""

    reconnect = False

    def __init__(self, stdin_fd: int = 0, stdout_fd: int = 1, progress: bool = False) -> None:
        self.stdin_fd = stdin_fd
        self.stdout_fd = stdout_fd
        self.progress = progress  # the status line shows bytes and rates (stderr only)
        self._interrupted: asyncio.Event | None = None
        self.received = 0
        self.sent = 0
        self.streams = 0
        self.path = ""  # the link's path, once linked
        self.started_at: float | None = None  # loop time the link came up
        self._last_received_at = 0.0  # loop time of the peer's latest data

    async def prepare(self) -> None:
        self._interrupted = asyncio.Event()

    def interrupt(self) -> None:
        assert self._interrupted is not None
        self._interrupted.set()

    async def close(self) -> None:
        pass

    async def run(self, session: Session, link: SecureLink) -> Ending:
        assert self._interrupted is not None
        self.path = link.path or "direct"
        self.started_at = asyncio.get_running_loop().time()
        interrupted = asyncio.ensure_future(self._interrupted.wait())
        refuser: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        stream: Stream | None = None
        try:
            opening = asyncio.ensure_future(open_pipe(session, link))
            await asyncio.wait([opening, interrupted], return_when=asyncio.FIRST_COMPLETED)
            if not opening.done():
                opening.cancel()
                await asyncio.gather(opening, return_exceptions=True)
                raise TransferAborted("interrupted before the transfer began")
            stream = opening.result()
            self.streams = 1
            refuser = asyncio.ensure_future(_refuse_streams(session))  # after ours is taken
            if self.progress:
                async with status.ticking(self._progress_line(), status.MIN_INTERVAL):
                    await self._transfer(stream, interrupted)
            else:
                await self._transfer(stream, interrupted)
        except BaseException:
            # Never a receipt for a transfer that did not complete: reset, CANCELLED.
            if stream is not None:
                stream.reset()
            await session.close(GoAwayCode.CANCELLED, linger=LINGER)
            raise
        finally:
            for task in (refuser, interrupted):
                task.cancel()
            await asyncio.gather(refuser, interrupted, return_exceptions=True)
        # Both directions are done here: our go-away is our receipt, the peer's is its.
        await session.close(linger=LINGER if self._interrupted.is_set() else None)
        if session.peer_confirmed:
            return Ending.BY_US
        cause = f" ({session.error.cause})" if session.error is not None else ""
        raise TransferAborted(f"the peer did not confirm that it took all of our data{cause}")

    def _progress_line(self) -> Callable[[], str]:
        """pv's line: bytes each way with the rate over the last second or so, and time."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        last = [(start, 0, 0)]  # (time, sent, received), the last few samples

        def render() -> str:
            now = loop.time()
            last.append((now, self.sent, self.received))
            del last[:-5]  # ~1 s of samples at 4 a second
            then, sent_then, received_then = last[0]
            span = max(now - then, 1e-3)
            up = (self.sent - sent_then) / span
            down = (self.received - received_then) / span
            return (
                f"sent {status.size(self.sent)} ({status.size(up)}/s), "
                f"received {status.size(self.received)} ({status.size(down)}/s), "
                f"{status.seconds(now - start)}"
            )

        return render

    async def _transfer(self, stream: Stream, interrupted: asyncio.Future[bool]) -> None:
        """Both directions, until both have ended in order; raises on anything else."""
        source, sink = StdinSource(self.stdin_fd), StdoutSink(self.stdout_fd)
        terminal = os.isatty(self.stdin_fd)
        sending = asyncio.ensure_future(self._send(source, stream))
        receiving = asyncio.ensure_future(self._receive(stream, sink))
        waiting: set[asyncio.Future] = {sending, receiving, interrupted}
        try:
            while not (sending.done() and receiving.done()):
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for task in done & {sending, receiving}:
                    task.result()  # a failure ends the transfer here
                if receiving.done() and terminal and not sending.done():
                    # A person at a prompt: the peer's data has ended, so has the session.
                    sending.cancel()
                    await asyncio.gather(sending, return_exceptions=True)
                    stream.write_eof()
                    break
                if interrupted in done:
                    waiting.discard(interrupted)
                    if not await self._finishes_by_itself(source, sending, receiving):
                        raise TransferAborted(self._interrupted_message(stream))
            await stream.wait_closed()  # our data and FIN are out before the go-away
        finally:
            source.stop()
            for task in (sending, receiving):
                task.cancel()
            await asyncio.gather(sending, receiving, return_exceptions=True)

    async def _finishes_by_itself(
        self, source: StdinSource, sending: asyncio.Future[None], receiving: asyncio.Future[None]
    ) -> bool:
        """After a signal: is the transfer ending in order anyway? That is ssh's logout: it
        closes our input, then signals us at once, having taken what it wanted; the peer's
        data has ended, or ends in a moment with nothing after what we last received.

        So: our input must have ended (its writer gone), and after the peer's latest data;
        then the rest may take SIGNAL_GRACE. A signal while the peer's data still flows
        (our input having ended long before) cuts the transfer short.
        """
        if not (sending.done() or source.at_eof_now()):
            return False
        input_end = source.ended_at if source.ended else asyncio.get_running_loop().time()
        if not (receiving.done() or input_end >= self._last_received_at):
            return False
        await asyncio.wait([sending, receiving], timeout=SIGNAL_GRACE)
        return sending.done() and receiving.done()

    def _interrupted_message(self, stream: Stream) -> str:
        theirs = "complete" if stream.peer_ended else f"{self.received} bytes so far"
        return (
            f"interrupted: the transfer was cut short ({self.sent} bytes sent, peer's data "
            f"{theirs}); the peer was told"
        )

    async def _send(self, source: StdinSource, stream: Stream) -> None:
        try:
            while chunk := await source.read():
                stream.write(chunk)
                self.sent += len(chunk)
                await stream.drain()
            stream.write_eof()
        except StreamReset as exc:
            raise self._reset_by_peer(stream) from exc

    async def _receive(self, stream: Stream, sink: StdoutSink) -> None:
        try:
            while chunk := await stream.read(CHUNK):
                self._last_received_at = asyncio.get_running_loop().time()
                await sink.write(chunk)
                self.received += len(chunk)
        except (StreamReset, Closed, LinkBroken) as exc:
            with contextlib.suppress(TeteError):
                await sink.close()  # what did arrive is written out
            if isinstance(exc, StreamReset):
                raise self._reset_by_peer(stream) from exc
            if isinstance(exc, Closed):
                raise TransferAborted(
                    "the peer closed the session before its data ended "
                    f"(after {self.received} bytes)"
                ) from exc
            raise
        await sink.close()
        logmod.event("Peer closed connection")

    def _reset_by_peer(self, stream: Stream) -> TransferAborted:
        if stream.peer_ended:
            return TransferAborted(
                "the peer did not take all of our data (it was interrupted, or its output "
                f"was closed); {self.sent} bytes were sent"
            )
        return TransferAborted(
            f"the peer aborted the transfer: its data ended early, after {self.received} bytes"
        )
