"""Window tuning over a simulated long path: the mux window against TCP's slow start.

No sockets and no clock: a small discrete-time model of one stream over a path with a fixed
one-way delay. The sender's TCP starts with a small congestion window that grows by what is
acknowledged (doubling each round trip, as slow start does) up to what the path holds; the
sender may hand TCP only what the peer's mux window allows. The receiving side is the real
`Connection`: it is fed the DATA frames as they arrive, the application takes them at once,
and its WINDOW_UPDATE frames reach the sender one delay (plus `lag`) later. Time is what the
model says, so the assertions are about the rule, not about this machine.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from tete_tunnel.mux.connection import INITIAL_WINDOW, Config, Connection
from tete_tunnel.mux.frames import Flag, FrameDecoder, FrameType, encode_header

MiB = 1024 * 1024
DELAY = 0.05  # one way: a 100 ms round trip
TICK = 0.0005
PACKET = 64 * 1024  # what TCP hands over at once (a GSO packet)
FIRST_CWND = 14480  # ten segments


@dataclass
class Outcome:
    seconds: float  # from the first byte sent to the last one delivered
    window: int  # the receiver's window for the stream at the end
    largest: int  # the largest it ever was


def transfer(total: int, path: int, config: Config | None, *, lag: float = 0.0) -> Outcome:
    """Move `total` bytes over a path holding `path` bytes in flight; config None: no mux
    window at all (TCP alone)."""
    receiver = Connection(client=False, config=config or Config())
    receiver.ping(0.0)  # one RTT sample, as the session takes at start
    receiver.data_to_send()
    now = 2 * DELAY
    receiver.receive_data(encode_header(FrameType.PING, Flag.ACK, 0, 1), now)
    receiver.receive_data(encode_header(FrameType.WINDOW_UPDATE, Flag.SYN, 1, 0), now)
    receiver.accept_stream(1)
    receiver.data_to_send()
    start = now
    credit = INITIAL_WINDOW if config is not None else total
    cwnd, in_flight, sent, delivered, largest = FIRST_CWND, 0, 0, 0, INITIAL_WINDOW
    queue: list[tuple[float, int, str, int]] = []  # (due, order, what, bytes)
    order = 0
    while delivered < total:
        room = min(cwnd - in_flight, credit, total - sent)
        while room > 0:
            n = min(room, PACKET)
            heapq.heappush(queue, (now + DELAY, order, "data", n))
            order += 1
            in_flight, credit, sent, room = in_flight + n, credit - n, sent + n, room - n
        now += TICK
        while queue and queue[0][0] <= now:
            due, _, what, n = heapq.heappop(queue)
            if what == "data":
                delivered += n
                heapq.heappush(queue, (due + DELAY, order, "ack", n))
                order += 1
                if config is None:
                    continue
                receiver.receive_data(encode_header(FrameType.DATA, 0, 1, n) + bytes(n), due)
                receiver.consumed(1, n, due)
                decoder = FrameDecoder()
                decoder.feed(b"".join(receiver.data_to_send()))
                while (frame := decoder.next_frame()) is not None:
                    assert frame.type is FrameType.WINDOW_UPDATE
                    heapq.heappush(queue, (due + DELAY + lag, order, "credit", frame.length))
                    order += 1
                largest = max(largest, receiver._streams[1].window)
            elif what == "ack":
                in_flight -= n
                cwnd = min(path, cwnd + n)
            else:
                credit += n
    window = receiver._streams[1].window if config is not None else 0
    return Outcome(now - start, window, largest)


def test_the_window_keeps_ahead_of_slow_start_on_a_long_fat_path() -> None:
    """100 ms, 40 MB in flight (400 MB/s): as fast as TCP alone, within 3%."""
    alone = transfer(256 * MiB, 40_000_000, None)
    mux = transfer(256 * MiB, 40_000_000, Config())
    assert mux.seconds <= 1.03 * alone.seconds
    assert mux.largest <= Config().max_window


def test_credit_that_arrives_late_costs_little() -> None:
    """Credit 10 ms later than the path's delay (a busy receiver) costs under 10%."""
    alone = transfer(256 * MiB, 40_000_000, None)
    mux = transfer(256 * MiB, 40_000_000, Config(), lag=0.01)
    assert mux.seconds <= 1.1 * alone.seconds


def test_a_16_mib_bound_holds_a_long_fat_path_back() -> None:
    """What the model shows for the bound before: the transfer takes a third longer."""
    alone = transfer(256 * MiB, 40_000_000, None)
    mux = transfer(256 * MiB, 40_000_000, Config(max_window=16 * MiB))
    assert mux.seconds >= 1.3 * alone.seconds
    assert mux.largest == 16 * MiB


def test_the_window_is_sized_to_the_path_not_to_the_bound() -> None:
    """A path of 2 MB per round trip (20 MB/s): the window stops at a few bandwidth-delay
    products, far below the 64 MiB a stream may have, and TCP alone is not faster."""
    alone = transfer(64 * MiB, 2_000_000, None)
    mux = transfer(64 * MiB, 2_000_000, Config())
    assert mux.seconds <= 1.03 * alone.seconds
    assert mux.largest <= 8 * 2_000_000
