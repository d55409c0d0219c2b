"""The mux session as a pure state machine (no sockets, no asyncio, no clock).

Theory of operation: the driver feeds received bytes to `receive_data(data, now)` and acts
on the events returned; it calls the local actions (`open_stream`, `send`, `end_stream`,
`reset_stream`, `consumed`, `ping`, `go_away`) as its application asks; and whenever
`has_data_to_send()` it writes what `data_to_send()` returns. Time is an argument; the
driver calls `handle_timer(now)` at `get_timer()`.

Rules: (1) a peer's violation never raises out of `receive_data`: the go-away frame is
queued and a ConnectionTerminated event ends the list, after which input is ignored.
(2) Everything the peer can make us hold is bounded: receive buffers by the window we
granted, streams and pending opens by count, queued control frames by count.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from tete_tunnel.mux import events as ev
from tete_tunnel.mux.errors import GoAwayCode, LocalProtocolError, ProtocolError
from tete_tunnel.mux.frames import (
    MAX_SEND_PAYLOAD,
    MAX_U32,
    Flag,
    Frame,
    FrameDecoder,
    FrameType,
    encode_header,
)
from tete_tunnel.mux.stream import StreamInput, StreamState, transition

INITIAL_WINDOW = 256 * 1024  # yamux's initial stream window; both sides assume it
# Credit goes back after half the window is consumed, or after this much for a large one:
# waiting for half of a 64 MiB window would leave only about half of it in flight.
UPDATE_STEP = 1024 * 1024
# Window tuning. The bandwidth-delay product of a stream is measured as the bytes the
# application consumed over the last round trip (an interval of at least one ping RTT, so
# bursts of reads even out), and the window grows toward GROWTH_RTTS times it: on a path
# that limits the rate, that is GROWTH_RTTS times what is in flight; while the window itself
# limits the rate (a transfer starting), it is about GROWTH_RTTS times the window, which keeps
# the window ahead of TCP's slow start (doubling each round trip) although the credit that
# lets the sender go on arrives half a round trip late. Each update adds at most
# GROWTH_PER_UPDATE times the credit it returns and at most twice the window (it at most
# triples), and never beyond max_window or the session's budget (docs/PERFORMANCE.md).
GROWTH_RTTS = 4
GROWTH_PER_UPDATE = 4

# Flags as plain ints on the hot path: IntFlag arithmetic builds enum objects every time.
_SYN, _ACK, _FIN, _RST = int(Flag.SYN), int(Flag.ACK), int(Flag.FIN), int(Flag.RST)


@dataclass(frozen=True)
class Config:
    initial_window: int = INITIAL_WINDOW
    # A stream's receive window grows toward the bandwidth-delay product, to this bound: what
    # one stream may make us buffer. 64 MiB carries ~600 MB/s over 100 ms; one TCP connection
    # with Linux's buffer limits raised to 64 MiB carries less.
    max_window: int = 64 * 1024 * 1024
    # All growth beyond the initial windows, summed over streams: the memory a peer can
    # make us buffer beyond max_streams * initial_window. At least max_window, so a single
    # stream on a long fat link may grow to the bound.
    window_budget: int = 64 * 1024 * 1024
    # Open at once, both directions; excess peer opens get RST. With the initial window,
    # this bounds what a peer can make us buffer: max_streams * 256 KiB + window_budget.
    max_streams: int = 1024
    max_pending_accepts: int = 1024  # peer opens the application has not accepted yet
    # Token buckets for what a peer may make us do per second. Opens beyond the rate are
    # refused with RST (each open can cost the application a connection to a target);
    # resets beyond theirs make us refuse its opens until the bucket refills: the HTTP/2
    # "Rapid Reset" pattern (open, reset, repeat) never gets more work started than that.
    # Opens: above what short connections through a forward reach (docs/PERFORMANCE.md).
    max_open_rate: float = 5000.0
    open_burst: int = 10000
    max_reset_rate: float = 1000.0
    reset_burst: int = 2000
    # Frames the peer provokes (pongs, refusals) that may wait unsent; more means it floods
    # us while not reading.
    max_control_backlog: int = 1024
    keepalive_interval: float | None = None  # seconds between pings; None: no keepalive
    keepalive_timeout: float = 30.0  # no pong for this long: the peer is dead
    turn_bytes: int = 1024 * 1024  # one stream's share per round-robin turn (at most)

    def __post_init__(self) -> None:
        # The peer assumes yamux's fixed initial window; any other value here makes an honest
        # peer overrun a smaller one (a protocol error) or stall on a larger one (no update
        # is due before it has sent half of it). Larger windows come from tuning.
        if self.initial_window != INITIAL_WINDOW:
            raise ValueError(f"initial_window must be {INITIAL_WINDOW} (yamux fixes it)")
        if self.turn_bytes < 1:
            raise ValueError("turn_bytes must be at least 1")  # 0 would spin data_to_send


class _Bucket:
    """A token bucket on the caller's clock: `rate` tokens a second, at most `burst`."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.last: float | None = None

    def refill(self, now: float) -> None:
        if self.last is not None and now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now

    def take(self, now: float) -> bool:
        self.refill(now)
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class _Stream:
    __slots__ = (
        "acked",
        "bdp",
        "fin_pending",
        "id",
        "need_ack",
        "need_syn",
        "out",
        "out_bytes",
        "per_rtt",
        "rate_bytes",
        "rate_mark",
        "recv_window",
        "send_window",
        "state",
        "unacked",
        "window",
    )

    def __init__(self, stream_id: int, config: Config, *, local: bool) -> None:
        self.id = stream_id
        self.state = StreamState.OPEN
        self.need_syn = local  # our first frame on it must carry SYN
        self.need_ack = False  # ... or ACK, once the application accepted the peer's open
        self.acked = not local
        self.fin_pending = False
        self.out: deque[memoryview] = deque()
        self.out_bytes = 0
        self.send_window = INITIAL_WINDOW  # the peer's grant to us
        self.window = config.initial_window  # our grant's current size
        self.recv_window = config.initial_window  # what the peer may still send
        self.unacked = 0  # consumed by the application, not yet granted back
        # Window tuning: bytes consumed since rate_mark (None: nothing consumed yet), and
        # the bytes consumed in one round trip, as last measured.
        self.rate_mark: float | None = None
        self.rate_bytes = 0
        self.per_rtt = 0
        self.bdp = 0

    def wants_turn(self) -> bool:
        if self.need_ack and not self.out and not self.fin_pending:
            return True
        if self.out and self.send_window > 0:
            return True
        return (self.fin_pending or self.need_syn) and not self.out


class Connection:
    def __init__(self, *, client: bool, config: Config | None = None) -> None:
        self.config = config or Config()
        self.client = client
        self._next_id = 1 if client else 2
        self._streams: dict[int, _Stream] = {}
        self._highest_remote = 0
        self._decoder = FrameDecoder()
        self._control: list[bytes | memoryview] = []
        self._provoked = 0  # peer-provoked control frames not yet taken by data_to_send
        self._ready: deque[int] = deque()  # streams that may have a turn
        self._in_ready: set[int] = set()
        self._pending_accepts: set[int] = set()
        self._budget_used = 0
        self._ping_opaque = 0
        self._ping_sent: float | None = None  # time of the outstanding ping
        self._next_keepalive: float | None = None
        self.rtt: float | None = None
        self.local_goaway = False
        self.remote_goaway = False
        self.terminated: ev.ConnectionTerminated | None = None
        self._gone: list[int] = []  # streams forgotten since the last pop_closed()
        self.queued_bytes = 0  # written by the application, not yet framed, all streams
        self._opens = _Bucket(self.config.max_open_rate, self.config.open_burst)
        self._resets = _Bucket(self.config.max_reset_rate, self.config.reset_burst)
        # What the peer was refused, for the driver to report (it reads and clears them).
        self.refused_opens = 0  # over max_streams / max_pending_accepts
        self.throttled_opens = 0  # over the open or reset rate

    # -- queries ----------------------------------------------------------------------

    @property
    def stream_ids(self) -> list[int]:
        return list(self._streams)

    def has_stream(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def send_buffered(self, stream_id: int) -> int:
        """Bytes the application wrote on a stream that are not yet framed."""
        stream = self._streams.get(stream_id)
        return stream.out_bytes if stream else 0

    def pop_closed(self) -> list[int]:
        """Streams whose state is gone (both sides ended, or reset) since the last call."""
        gone, self._gone = self._gone, []
        return gone

    def has_data_to_send(self) -> bool:
        return bool(self._control) or bool(self._ready)

    def is_local(self, stream_id: int) -> bool:
        return (stream_id % 2 == 1) == self.client

    # -- local actions ----------------------------------------------------------------

    def open_stream(self) -> int:
        """A new stream id; its SYN rides on the first frame sent, with data if there is any."""
        self._check_alive()
        if self.remote_goaway or self.local_goaway:
            raise LocalProtocolError("the session is going away: no new streams")
        if len(self._streams) >= self.config.max_streams:
            raise LocalProtocolError(f"too many open streams ({self.config.max_streams})")
        if self._next_id > MAX_U32:
            raise LocalProtocolError("stream ids exhausted; start a new session")
        stream_id = self._next_id
        self._next_id += 2
        self._streams[stream_id] = _Stream(stream_id, self.config, local=True)
        self._mark_ready(stream_id)
        return stream_id

    def accept_stream(self, stream_id: int, *, ack_now: bool = True) -> None:
        """Accept the peer's open: a bare ACK goes out now, or with `ack_now=False` the ACK
        rides on our first frame on the stream (yamux allows either), which saves a frame,
        and a TLS record, when the application answers soon anyway."""
        stream = self._get(stream_id)
        if stream_id not in self._pending_accepts:
            raise LocalProtocolError(f"stream {stream_id} is not waiting to be accepted")
        self._pending_accepts.discard(stream_id)
        stream.need_ack = True
        if ack_now:
            self._mark_ready(stream_id)

    def send(self, stream_id: int, data: bytes | bytearray | memoryview) -> None:
        stream = self._get(stream_id)
        stream.state = transition(stream.state, StreamInput.SEND_DATA, stream_id)
        if data:
            stream.out.append(memoryview(data).cast("B"))
            stream.out_bytes += len(data)
            self.queued_bytes += len(data)
            self._mark_ready(stream_id)

    def end_stream(self, stream_id: int) -> None:
        """Half-close our direction; the FIN follows the data already written."""
        stream = self._get(stream_id)
        stream.state = transition(stream.state, StreamInput.SEND_FIN, stream_id)
        stream.fin_pending = True
        self._mark_ready(stream_id)

    def reset_stream(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            return  # already gone: a reset has nothing left to do
        transition(stream.state, StreamInput.SEND_RST, stream_id)
        if not stream.need_syn:  # the peer knows the stream: tell it
            flags = Flag.RST | (Flag.ACK if stream.need_ack else Flag.NONE)
            self._control.append(encode_header(FrameType.WINDOW_UPDATE, flags, stream_id, 0))
        self._forget(stream)

    def consumed(self, stream_id: int, n: int, now: float) -> None:
        """The application took `n` bytes of a stream: grant them back, growing the window
        toward GROWTH_RTTS times the bandwidth-delay product measured (see GROWTH_RTTS)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.state in (StreamState.HALF_CLOSED_REMOTE, StreamState.CLOSED):
            return  # the peer sends no more: no credit needed
        if n:
            self._measure(stream, n, now)
        stream.unacked += n
        if stream.unacked < min(stream.window // 2, UPDATE_STEP):
            return
        delta = stream.unacked
        grow = min(
            GROWTH_RTTS * stream.bdp - stream.window,
            GROWTH_PER_UPDATE * delta,
            2 * stream.window,
            self.config.max_window - stream.window,
            self.config.window_budget - self._budget_used,
        )
        if grow > 0:
            stream.window += grow
            self._budget_used += grow
            delta += grow
        stream.unacked = 0
        stream.recv_window += delta
        flags = self._opening_flags(stream)  # the update may be our first frame on it
        self._control.append(encode_header(FrameType.WINDOW_UPDATE, flags, stream_id, delta))

    def _measure(self, stream: _Stream, n: int, now: float) -> None:
        """Count `n` bytes consumed; once a round trip has passed since the mark, take the
        bytes consumed per round trip as the stream's bandwidth-delay product."""
        if stream.rate_mark is None:
            stream.rate_mark = now  # these bytes arrived before the mark: not counted
            return
        stream.rate_bytes += n
        elapsed = now - stream.rate_mark
        if self.rtt is not None and elapsed >= self.rtt:
            per_rtt = int(stream.rate_bytes * self.rtt / elapsed)
            # Growing (a sender in slow start): what the next round trip will bring.
            if 0 < stream.per_rtt < per_rtt:
                stream.bdp = per_rtt * min(per_rtt, 2 * stream.per_rtt) // stream.per_rtt
            else:
                stream.bdp = per_rtt
            stream.per_rtt = per_rtt
            stream.rate_mark = now
            stream.rate_bytes = 0

    def ping(self, now: float) -> bool:
        """Send a ping unless one is outstanding; its pong reports the round-trip time."""
        self._check_alive()
        if self._ping_sent is not None:
            return False
        self._ping_opaque = (self._ping_opaque + 1) & MAX_U32
        self._ping_sent = now
        self._control.append(encode_header(FrameType.PING, Flag.SYN, 0, self._ping_opaque))
        return True

    def go_away(self, code: GoAwayCode = GoAwayCode.NORMAL) -> None:
        if not self.local_goaway:
            self.local_goaway = True
            self._control.append(encode_header(FrameType.GO_AWAY, Flag.NONE, 0, code))

    # -- timers -----------------------------------------------------------------------

    def start_keepalive(self, now: float) -> None:
        if self.config.keepalive_interval is not None:
            self._next_keepalive = now + self.config.keepalive_interval

    def get_timer(self) -> float | None:
        times = []
        if self._next_keepalive is not None:
            times.append(self._next_keepalive)
        if self._ping_sent is not None and self.config.keepalive_interval is not None:
            times.append(self._ping_sent + self.config.keepalive_timeout)
        return min(times) if times else None

    def handle_timer(self, now: float) -> list[ev.Event]:
        if self.terminated is not None or self.config.keepalive_interval is None:
            return []
        if self._ping_sent is not None and now - self._ping_sent >= self.config.keepalive_timeout:
            self.terminated = ev.ConnectionTerminated(
                GoAwayCode.INTERNAL_ERROR,
                f"the peer answered no ping for {self.config.keepalive_timeout:g} s",
            )
            return [self.terminated]
        if self._next_keepalive is not None and now >= self._next_keepalive:
            self.ping(now)
            self._next_keepalive = now + self.config.keepalive_interval
        return []

    # -- output -----------------------------------------------------------------------

    def data_to_send(self, limit: int = 1 << 20) -> list[bytes | memoryview]:
        """Control frames first, then data from ready streams in turn, about `limit` bytes."""
        out: list[bytes | memoryview] = self._control
        size = sum(map(len, out))
        self._control = []
        self._provoked = 0
        while self._ready and size < limit:
            stream_id = self._ready.popleft()
            self._in_ready.discard(stream_id)
            stream = self._streams.get(stream_id)
            if stream is None:
                continue
            size += self._take_turn(stream, out, min(self.config.turn_bytes, limit - size))
            if stream.wants_turn():
                self._mark_ready(stream_id)
        return out

    def _take_turn(self, stream: _Stream, out: list[bytes | memoryview], budget: int) -> int:
        size = 0
        while True:
            flags = self._opening_flags(stream)
            n = min(stream.out_bytes, stream.send_window, budget - size, MAX_SEND_PAYLOAD)
            if n > 0:
                chunks = self._take(stream, n)
                if not stream.out and stream.fin_pending:
                    flags |= _FIN
                    stream.fin_pending = False
                out.append(encode_header(FrameType.DATA, flags, stream.id, n))
                out.extend(chunks)
                size += 12 + n
                if not (flags & _FIN) and size < budget and stream.out and stream.send_window:
                    continue
            elif flags or (stream.fin_pending and not stream.out):
                if stream.fin_pending and not stream.out:
                    flags |= _FIN
                    stream.fin_pending = False
                out.append(encode_header(FrameType.WINDOW_UPDATE, flags, stream.id, 0))
                size += 12
            break
        if (flags & _FIN) and stream.state is StreamState.CLOSED:
            self._forget(stream)
        return size

    def _opening_flags(self, stream: _Stream) -> int:
        if stream.need_syn:
            stream.need_syn = False
            return _SYN
        if stream.need_ack:
            stream.need_ack = False
            return _ACK
        return 0

    def _take(self, stream: _Stream, n: int) -> list[memoryview]:
        chunks = []
        left = n
        while left:
            head = stream.out[0]
            if len(head) <= left:
                chunks.append(stream.out.popleft())
                left -= len(head)
            else:
                chunks.append(head[:left])
                stream.out[0] = head[left:]
                left = 0
        stream.out_bytes -= n
        stream.send_window -= n
        self.queued_bytes -= n
        return chunks

    # -- input ------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview, now: float) -> list[ev.Event]:
        if self.terminated is not None:
            return []
        events: list[ev.Event] = []
        self._decoder.feed(data)
        try:
            while (frame := self._decoder.next_frame()) is not None:
                self._handle(frame, now, events)
        except ProtocolError as exc:
            # queued even after a normal go-away of ours: the peer learns why it ends
            self.local_goaway = True
            self._control.append(encode_header(FrameType.GO_AWAY, 0, 0, exc.error_code))
            self.terminated = ev.ConnectionTerminated(GoAwayCode.PROTOCOL_ERROR, str(exc))
            events.append(self.terminated)
        return events

    def _handle(self, frame: Frame, now: float, events: list[ev.Event]) -> None:
        if frame.type is FrameType.PING:
            self._handle_ping(frame, now, events)
        elif frame.type is FrameType.GO_AWAY:
            self.remote_goaway = True
            events.append(ev.GoAwayReceived(frame.length))
        else:
            self._handle_stream_frame(frame, now, events)

    def _handle_ping(self, frame: Frame, now: float, events: list[ev.Event]) -> None:
        flags = int(frame.flags)
        if flags & _SYN:
            self._provoke(encode_header(FrameType.PING, _ACK, 0, frame.length))
        elif flags & _ACK:
            if self._ping_sent is not None and frame.length == self._ping_opaque:
                rtt = max(now - self._ping_sent, 1e-6)
                self.rtt = rtt if self.rtt is None else 0.875 * self.rtt + 0.125 * rtt
                self._ping_sent = None
                events.append(ev.PongReceived(rtt))
        else:
            raise ProtocolError("ping with neither SYN nor ACK")

    def _handle_stream_frame(self, frame: Frame, now: float, events: list[ev.Event]) -> None:
        flags = int(frame.flags)
        sid = frame.stream_id
        stream = self._streams.get(sid)
        if flags & _SYN:
            if stream is not None or self.is_local(sid) or sid <= self._highest_remote:
                raise ProtocolError(f"the peer opened stream {sid}, which it may not (re)use")
            self._highest_remote = sid
            refused = (
                self.local_goaway
                or self.remote_goaway  # it said it is leaving: nothing new is accepted
                or len(self._streams) >= self.config.max_streams
                or len(self._pending_accepts) >= self.config.max_pending_accepts
            )
            if refused:
                self.refused_opens += 1
            else:
                self._resets.refill(now)
                if self._resets.tokens < 1 or not self._opens.take(now):
                    self.throttled_opens += 1
                    refused = True
            if refused:
                self._provoke(encode_header(FrameType.WINDOW_UPDATE, _ACK | _RST, sid, 0))
                return  # refused: later frames for it are late frames of a known id
            stream = self._streams[sid] = _Stream(sid, self.config, local=False)
            self._pending_accepts.add(sid)
            events.append(ev.StreamOpened(sid))
        elif stream is None:
            known = sid < self._next_id if self.is_local(sid) else sid <= self._highest_remote
            if not known:
                raise ProtocolError(f"frame for stream {sid}, which was never opened")
            return  # a late frame for a stream that is gone (reset or refused)
        if flags & _ACK:
            stream.acked = True
        if frame.type is FrameType.WINDOW_UPDATE:
            if stream.send_window + frame.length > MAX_U32:
                raise ProtocolError(f"window of stream {sid} grown past 2^32-1")
            stream.send_window += frame.length
            if frame.length and stream.wants_turn():
                self._mark_ready(sid)
        elif frame.length:
            if frame.length > stream.recv_window:
                raise ProtocolError(
                    f"stream {sid}: {frame.length} bytes of data beyond the "
                    f"{stream.recv_window} bytes of window granted"
                )
            stream.state = transition(stream.state, StreamInput.RECV_DATA, sid)
            stream.recv_window -= frame.length
            events.append(ev.DataReceived(sid, bytes(frame.payload)))
        if flags & _FIN:
            stream.state = transition(stream.state, StreamInput.RECV_FIN, sid)
            events.append(ev.StreamEnded(sid))
            if stream.state is StreamState.CLOSED and not stream.fin_pending:
                self._forget(stream)
        if flags & _RST:  # allowed in every state; the stream is gone at once
            self._resets.take(now)
            events.append(ev.StreamReset(sid))
            self._forget(stream)

    # -- helpers ----------------------------------------------------------------------

    def _provoke(self, frame: bytes) -> None:
        self._provoked += 1
        if self._provoked > self.config.max_control_backlog:
            raise ProtocolError(
                f"the peer provoked over {self.config.max_control_backlog} replies "
                "without reading them (a ping or open flood)"
            )
        self._control.append(frame)

    def _mark_ready(self, stream_id: int) -> None:
        if stream_id not in self._in_ready:
            self._in_ready.add(stream_id)
            self._ready.append(stream_id)

    def _get(self, stream_id: int) -> _Stream:
        self._check_alive()
        stream = self._streams.get(stream_id)
        if stream is None:
            raise LocalProtocolError(f"stream {stream_id} is not open")
        return stream

    def _check_alive(self) -> None:
        if self.terminated is not None:
            raise LocalProtocolError(f"the session has ended: {self.terminated.reason}")

    def _forget(self, stream: _Stream) -> None:
        stream.state = StreamState.CLOSED
        if self._streams.pop(stream.id, None) is not None:
            self._budget_used -= stream.window - self.config.initial_window
            self.queued_bytes -= stream.out_bytes  # a reset drops what was not sent
            stream.out.clear()
            stream.out_bytes = 0
            self._gone.append(stream.id)
        self._pending_accepts.discard(stream.id)
        self._in_ready.discard(stream.id)
