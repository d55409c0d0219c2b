"""TLS on the socket itself: an asyncio transport over an `ssl.SSLSocket`.

asyncio's (and uvloop's) TLS transport runs OpenSSL over memory BIOs: every byte is read
from the socket into a buffer, copied into the BIO, and only then decrypted (and the same
twice over on the way out). Here OpenSSL reads and writes the non-blocking socket itself,
driven by the loop's add_reader/add_writer: ciphertext goes from the kernel straight into
OpenSSL's record buffer, and plaintext from there straight into the protocol's buffer.

What the session relies on, as with asyncio's transport: a BufferedProtocol's reads land in
its own buffer; eof_received for the peer's close_notify or a bare TCP FIN; connection_lost
with the OSError that ended the link (ConnectionResetError for an RST, an SSLError for a
corrupt record), or None; pause_writing/resume_writing at the write buffer's water marks;
close() = close_notify once the buffer is out, then FIN; abort() = drop everything now.

One thread drives one SSL object: OpenSSL does not allow SSL_read and SSL_write on one SSL
object from two threads at once.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import socket
import ssl
from collections.abc import Callable
from typing import Any

log = logging.getLogger("tete_tunnel")

# Reads for a plain Protocol (the handshake's carrier: a few bytes) land here first.
SMALL_READ = 64 * 1024
# Queued writes shorter than this are joined before they go out: each SSL_write is at
# least one TLS record, and a record per 12-byte frame would waste both ends' CPU.
JOIN_BELOW = 64 * 1024
JOIN_UP_TO = 512 * 1024
RECORD = 16 * 1024  # the plaintext of a full TLS record
DEFAULT_HIGH_WATER = 64 * 1024  # asyncio's default
# After close(), how long the close_notify exchange may take before the socket is simply
# closed (asyncio's ssl_shutdown_timeout is the same 30 s): a peer that never reads or never
# answers cannot keep a closed link open.
SHUTDOWN_TIMEOUT = 30.0
# A write larger than this goes out corked (TCP_CORK): every TLS record is one write to
# the socket, and with TCP_NODELAY each 16 KiB record would end in a short segment of its
# own (and on loopback be a packet of its own); corked, TCP fills its segments across
# records, as it did when asyncio's transport wrote whole batches of records at once.
CORK_ABOVE = 32 * 1024
# While draining a peer that still sends after our close_notify: reads per loop turn.
DRAIN_READS = 16


async def open_transport(
    sock: socket.socket, ctx: ssl.SSLContext, server_side: bool, protocol: asyncio.BaseProtocol
) -> TLSSocketTransport:
    """TLS over a connected non-blocking socket, handshaken and started for `protocol`;
    the caller bounds the time.

    The SSLSocket takes over the socket's descriptor (`sock` is detached): on failure it is
    closed here, and the caller's `sock.close()` is then harmless.
    """
    tls_sock = ctx.wrap_socket(
        sock,
        server_side=server_side,
        do_handshake_on_connect=False,
        suppress_ragged_eofs=False,
        server_hostname=None if server_side else "tete-tunnel",
    )
    try:
        await handshake(tls_sock)
    except BaseException:
        tls_sock.close()
        raise
    transport = TLSSocketTransport(asyncio.get_running_loop(), tls_sock, protocol)
    transport.start()
    return transport


async def handshake(sock: ssl.SSLSocket) -> None:
    """Run the TLS handshake on a non-blocking SSLSocket; the caller bounds the time."""
    loop = asyncio.get_running_loop()
    fd = sock.fileno()
    while True:
        try:
            sock.do_handshake()
            return
        except ssl.SSLWantReadError:
            add, remove = loop.add_reader, loop.remove_reader
        except ssl.SSLWantWriteError:
            add, remove = loop.add_writer, loop.remove_writer
        ready = loop.create_future()
        add(fd, _resolve, ready)
        try:
            await ready
        finally:
            remove(fd)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class TLSSocketTransport(asyncio.Transport):
    """A connected, handshaken SSLSocket as an asyncio transport (see the module's doc)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: ssl.SSLSocket,
        protocol: asyncio.BaseProtocol,
    ) -> None:
        super().__init__()
        self._loop = loop
        self._sock: ssl.SSLSocket | None = sock
        self._fd = sock.fileno()
        self._extra = {
            "socket": sock,
            "ssl_object": sock,
            "peername": _name(sock.getpeername),
            "sockname": _name(sock.getsockname),
            "peercert": sock.getpeercert(),
            "cipher": sock.cipher(),
            "compression": sock.compression(),
        }
        self._ssl_read = _ssl_read(sock)
        self._corkable = sock.family in (socket.AF_INET, socket.AF_INET6)  # not a socketpair
        self._protocol = protocol
        self._buffered = isinstance(protocol, asyncio.BufferedProtocol)
        self._small: memoryview | None = None
        self._reading = False  # our reader is registered
        self._read_paused = False  # the protocol asked us to stop
        self._eof = False  # the peer's close_notify or FIN has been seen
        self._writing = False  # our writer is registered
        self._queue: collections.deque[bytes | memoryview] = collections.deque()
        self._queued = 0
        # The buffer of an SSL_write that returned WANT_WRITE: OpenSSL has sent part of
        # it and must be given the same bytes again.
        self._retry: bytes | memoryview | None = None
        self._read_wants_write = False
        self._write_wants_read = False
        self._high = DEFAULT_HIGH_WATER
        self._low = DEFAULT_HIGH_WATER // 4
        self._protocol_paused = False
        self._closing = False  # close() or abort() was called, or the link failed
        self._shutting_down = False  # close_notify is being exchanged
        self._shutdown_timer: asyncio.TimerHandle | None = None
        self._lost = False  # connection_lost has been scheduled

    def start(self) -> None:
        """Tell the protocol, then read: what OpenSSL may already hold is read at once."""
        self._protocol.connection_made(self)
        self._resume_reader()
        self._loop.call_soon(self._read_ready)

    # -- asyncio.BaseTransport ---------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Send what is queued, then close_notify, then close (FIN)."""
        if self._closing:
            return
        self._closing = True
        self._pause_reader()  # as asyncio's transports: no data for the protocol after close
        self._shutdown_timer = self._loop.call_later(SHUTDOWN_TIMEOUT, self._shutdown_expired)
        if not self._queue and self._retry is None:
            self._start_shutdown()

    def abort(self) -> None:
        """Close at once, queued data dropped (an RST if the caller set SO_LINGER 0)."""
        self._force_close(None)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        self._buffered = isinstance(protocol, asyncio.BufferedProtocol)
        if self._buffered:
            self._small = None  # the handshake's read buffer: not needed any more

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    # -- asyncio.ReadTransport ---------------------------------------------------------

    def is_reading(self) -> bool:
        return not self._read_paused and not self._closing

    def pause_reading(self) -> None:
        if self._closing or self._read_paused:
            return
        self._read_paused = True
        self._pause_reader()

    def resume_reading(self) -> None:
        if self._closing or not self._read_paused:
            return
        self._read_paused = False
        if not self._eof:
            self._resume_reader()
            self._loop.call_soon(self._read_ready)  # OpenSSL may hold decrypted bytes

    # -- asyncio.WriteTransport --------------------------------------------------------

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = DEFAULT_HIGH_WATER if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        self._maybe_pause_protocol()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def get_write_buffer_size(self) -> int:
        return self._queued

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if self._closing or self._sock is None:
            return  # as asyncio's TLS transport: writes after close are dropped
        if isinstance(data, bytearray):
            data = bytes(data)  # the caller may reuse its bytearray
        if not self._queue and self._retry is None:
            sent = self._send(data)
            if sent is None:
                return  # the link failed
            if sent == len(data):
                return
            if sent:  # not with OpenSSL's default mode, but cheap to get right
                self._queue.append(memoryview(data)[sent:])
            self._queued += len(data) - sent
        else:
            self._queue.append(data)
            self._queued += len(data)
        self._resume_writer()
        self._maybe_pause_protocol()

    def writelines(self, list_of_data: Any) -> None:
        """Write in order without joining the large buffers (the session's frames: a
        header, then payloads of up to 1 MiB), which saves a copy of every byte."""
        for data in _whole_records(list_of_data):
            self.write(data)

    def write_eof(self) -> None:
        raise NotImplementedError("TLS has no half-close: close() sends close_notify")

    def can_write_eof(self) -> bool:
        return False

    # -- reading -----------------------------------------------------------------------

    def _read_ready(self) -> None:
        if self._sock is None or self._read_paused or self._eof or self._closing:
            return
        if self._write_wants_read:
            self._write_wants_read = False
            self._write_ready()
            if self._sock is None:
                return
        if self._read_wants_write:
            return  # the writer calls us back once the socket takes the bytes
        if self._buffered:
            self._read_buffered()
        else:
            self._read_plain()

    def _read_buffered(self) -> None:
        protocol = self._protocol
        assert isinstance(protocol, asyncio.BufferedProtocol)
        try:
            buffer = memoryview(protocol.get_buffer(-1))
        except Exception as exc:  # the transport contract: a failing protocol ends the link
            self._fatal_error(exc, "protocol.get_buffer() failed")
            return
        n, ended = self._fill(buffer)
        if n is None:
            return
        if n:
            try:
                protocol.buffer_updated(n)
            except Exception as exc:  # as above
                self._fatal_error(exc, "protocol.buffer_updated() failed")
                return
        self._after_read(ended, full=n == len(buffer))

    def _read_plain(self) -> None:
        if self._small is None:
            self._small = memoryview(bytearray(SMALL_READ))
        buffer = self._small
        n, ended = self._fill(buffer)
        if n is None:
            return
        if n:
            try:
                self._protocol.data_received(bytes(buffer[:n]))  # type: ignore[attr-defined]
            except Exception as exc:  # as above
                self._fatal_error(exc, "protocol.data_received() failed")
                return
        self._after_read(ended, full=n == len(buffer))

    def _fill(self, buffer: memoryview) -> tuple[int | None, bool]:
        """Decrypt into `buffer` until it is full or the socket has no more: (bytes, EOF).

        SSL_read returns one record (16 KiB) at most, so it is called until the buffer is
        full or OpenSSL wants more from the socket. (None, _) when the link failed.
        """
        sock = self._sock
        assert sock is not None
        size = len(buffer)
        n = 0
        read = self._ssl_read
        try:
            while n < size:
                got = read(size - n, buffer[n:] if n else buffer)
                if not got:
                    return n, True  # close_notify, or a bare FIN (see _after_read)
                n += got
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLWantWriteError:  # a key update to answer, and the socket is full
            self._read_wants_write = True
            self._resume_writer()
        except ssl.SSLZeroReturnError:  # close_notify (usually a read of 0, above)
            return n, True
        except OSError as exc:  # ConnectionResetError, ETIMEDOUT, a corrupt record...
            if isinstance(exc, ssl.SSLEOFError):
                lost = _lost(sock)
                if lost is None:
                    return n, True  # a FIN without close_notify: EOF, as asyncio reports it
                exc = lost
            if n:  # what came before it is the protocol's first
                self._loop.call_soon(self._fatal_error, exc, None)
                return n, False
            self._fatal_error(exc, None)
            return None, False
        return n, False

    def _after_read(self, ended: bool, full: bool) -> None:
        if self._sock is None:
            return
        if ended:
            self._eof = True
            self._pause_reader()
            try:
                keep_open = self._protocol.eof_received()  # type: ignore[attr-defined]
            except Exception as exc:  # as above
                self._fatal_error(exc, "protocol.eof_received() failed")
                return
            if not keep_open:
                self.close()
        elif full and not self._read_paused and self._sock.pending():
            # OpenSSL holds the rest of a record: the socket will not tell us about it.
            self._loop.call_soon(self._read_ready)

    # -- writing -----------------------------------------------------------------------

    def _send(self, data: bytes | memoryview) -> int | None:
        """SSL_write once: bytes taken (all, or 0 when it must be retried), None if failed."""
        sock = self._sock
        assert sock is not None
        cork = self._corkable and len(data) > CORK_ABOVE
        try:
            if cork:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
            try:
                return sock.send(data)
            finally:
                if cork:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
        except ssl.SSLWantWriteError:
            self._retry = data  # partly sent: the same buffer goes again
            return 0
        except ssl.SSLWantReadError:  # not in TLS 1.3 as used here; handled all the same
            self._retry = data
            self._write_wants_read = True
            return 0
        except OSError as exc:
            if isinstance(exc, ssl.SSLEOFError):
                exc = _lost(sock) or BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))
            self._fatal_error(exc, None)
            return None

    def _write_ready(self) -> None:
        if self._sock is None:
            return
        if self._read_wants_write:
            self._read_wants_write = False
            self._read_ready()
            if self._sock is None:
                return
        while self._retry is not None or self._queue:
            if self._retry is not None:
                data = self._retry
                self._retry = None
            else:
                data = self._next_chunk()
            sent = self._send(data)
            if sent is None:
                return
            self._queued -= sent
            if sent < len(data):
                if sent:
                    self._queue.appendleft(memoryview(data)[sent:])
                break  # the socket is full: the rest (or _retry) goes when it drains
        self._maybe_resume_protocol()
        if self._write_wants_read:
            self._pause_writer()  # the reader calls us back
        elif self._retry is None and not self._queue:
            if not self._read_wants_write:
                self._pause_writer()
            if self._closing and not self._shutting_down:
                self._start_shutdown()

    def _next_chunk(self) -> bytes | memoryview:
        """The next write: queued small writes joined into one (one record, not many)."""
        queue = self._queue
        first = queue.popleft()
        if len(first) >= JOIN_BELOW or not queue:
            return first
        parts, size = [first], len(first)
        while queue and len(queue[0]) < JOIN_BELOW and size + len(queue[0]) <= JOIN_UP_TO:
            part = queue.popleft()
            parts.append(part)
            size += len(part)
        return b"".join(parts)

    def _maybe_pause_protocol(self) -> None:
        if self._queued > self._high and not self._protocol_paused:
            self._protocol_paused = True
            try:
                self._protocol.pause_writing()
            except Exception as exc:  # as asyncio: reported, the link goes on
                self._report(exc, "protocol.pause_writing() failed")

    def _maybe_resume_protocol(self) -> None:
        if self._protocol_paused and self._queued <= self._low:
            self._protocol_paused = False
            try:
                self._protocol.resume_writing()
            except Exception as exc:  # as above
                self._report(exc, "protocol.resume_writing() failed")

    # -- closing -----------------------------------------------------------------------

    def _start_shutdown(self) -> None:
        self._shutting_down = True
        self._pause_reader()
        self._pause_writer()
        self._shutdown_step()

    def _shutdown_step(self) -> None:
        """One try at the close_notify exchange (SSL_shutdown), then wait for the socket."""
        sock = self._sock
        if sock is None:
            return
        self._pause_reader()
        self._pause_writer()
        try:
            sock.unwrap()
        except ssl.SSLWantReadError:  # ours went out; theirs has not come yet
            if self._eof:  # the peer has ended: no close_notify will come
                self._force_close(None)
            else:
                self._resume_reader(self._shutdown_step)
            return
        except ssl.SSLWantWriteError:
            self._resume_writer(self._shutdown_step)
            return
        except ssl.SSLError as exc:
            if exc.reason == "APPLICATION_DATA_AFTER_CLOSE_NOTIFY":
                self._drain()
                return
        except OSError:  # the peer is gone or broke the exchange: we are closing anyway
            pass
        self._force_close(None)

    def _drain(self) -> None:
        """The peer still sends after our close_notify: FIN behind it, then read and drop
        what comes until the peer closes too (or the shutdown timer, or the owner's
        abort, ends it). Closing with its data unread would send an RST at once, and an
        RST can destroy our last records (a GO_AWAY saying why) before the peer reads
        them; its writes would fail, too."""
        sock = self._sock
        assert sock is not None
        try:
            sock.shutdown(socket.SHUT_WR)  # the TLS layer is done: the socket is plain now
        except OSError:
            self._force_close(None)
            return
        self._resume_reader(self._drain_step)
        self._drain_step()

    def _drain_step(self) -> None:
        sock = self._sock
        if sock is None:
            return
        if self._small is None:
            self._small = memoryview(bytearray(SMALL_READ))
        try:
            for _ in range(DRAIN_READS):  # then other callbacks get a turn
                if not sock.recv_into(self._small):
                    break  # the peer's FIN: all read, so the close sends no RST
            else:
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self._force_close(None)

    def _shutdown_expired(self) -> None:
        self._shutdown_timer = None
        if self._sock is not None:
            log.debug("TLS close_notify exchange timed out; closing")
            self._force_close(None)

    def _fatal_error(self, exc: BaseException, message: str | None) -> None:
        if message is not None:  # a bug on our side, not the peer's doing
            self._report(exc, message)
        self._force_close(exc)

    def _report(self, exc: BaseException, message: str) -> None:
        self._loop.call_exception_handler(
            {"message": message, "exception": exc, "transport": self, "protocol": self._protocol}
        )

    def _force_close(self, exc: BaseException | None) -> None:
        sock = self._sock
        if sock is None:
            return
        self._closing = True
        self._pause_reader()
        self._pause_writer()
        self._sock = None
        self._queue.clear()
        self._queued = 0
        self._retry = None
        if self._shutdown_timer is not None:
            self._shutdown_timer.cancel()
            self._shutdown_timer = None
        sock.close()
        if not self._lost:
            self._lost = True
            self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        self._protocol.connection_lost(exc)  # type: ignore[arg-type]

    # -- the loop's reader and writer ----------------------------------------------------

    def _resume_reader(self, callback: Callable[[], None] | None = None) -> None:
        """Watch for readability: `callback` (the shutdown's, the drain's) or _read_ready."""
        if not self._reading and self._sock is not None:
            self._loop.add_reader(self._fd, callback or self._read_ready)
            self._reading = True

    def _pause_reader(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def _resume_writer(self, callback: Callable[[], None] | None = None) -> None:
        if not self._writing and self._sock is not None:
            self._loop.add_writer(self._fd, callback or self._write_ready)
            self._writing = True

    def _pause_writer(self) -> None:
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False


def _whole_records(parts: Any) -> list[bytes | memoryview]:
    """`parts` as few writes, large parts unjoined: the small ones before a large one are
    joined with its head up to the end of a record, so that no SSL_write but the last ends
    in a short record (each write ends its last record; a 12-byte header written alone
    would be a record of its own)."""
    out: list[bytes | memoryview] = []
    small: list[bytes | memoryview] = []
    size = 0
    for part in parts:
        if len(part) < JOIN_BELOW:
            small.append(part)
            size += len(part)
            continue
        if small:
            view = memoryview(part)
            head = RECORD - size % RECORD
            small.append(view[:head])
            out.append(b"".join(small))
            part = view[head:]
            small, size = [], 0
        out.append(part)
    if small:
        out.append(b"".join(small) if len(small) > 1 else small[0])
    return out


def _name(get: Callable[[], Any]) -> Any:
    try:
        return get()
    except OSError:
        return None


def _ssl_read(sock: ssl.SSLSocket) -> Callable[[int, memoryview], int]:
    """SSL_read into a buffer, as directly as the ssl module allows.

    SSLSocket.recv_into goes through two Python-level wrappers per call, and SSL_read
    returns one 16 KiB record per call: 65,536 calls per GiB. The C object underneath
    (`_sslobj`, the same `read(len, buffer)` the wrappers end in) saves that overhead
    (about 0.08 s of CPU per GiB on the receiving side here); recv_into where it is absent.
    """
    inner = getattr(sock, "_sslobj", None)
    read = getattr(inner, "read", None)
    if callable(read):
        return read  # type: ignore[no-any-return]
    return lambda n, buffer: sock.recv_into(buffer, n)


TCP_CLOSE = 7  # tcp_info's tcpi_state: reset or timed out (a FIN leaves CLOSE_WAIT)


def _lost(sock: socket.socket) -> OSError | None:
    """The error that ended the connection, when ssl reported it as a bare EOF.

    Python 3.11's ssl reports an ECONNRESET (or ETIMEDOUT) from SSL_read/SSL_write on the
    socket as SSLEOFError, "EOF occurred in violation of protocol" (SSL_read_ex returns 0,
    which it takes for EOF), and the kernel has handed the error out by then. The TCP state
    still tells: CLOSE after an RST or a timeout, CLOSE_WAIT after a FIN; a timeout leaves
    retransmissions or keepalive probes counted. None: not a TCP socket, or not closed.
    """
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    except (OSError, AttributeError):  # not TCP; or no TCP_INFO on this system
        return None
    state, retransmits, probes, backoff = info[0], info[2], info[3], info[4]
    if state != TCP_CLOSE:
        return None
    if retransmits or probes or backoff:
        return TimeoutError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT))
    return ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET))
